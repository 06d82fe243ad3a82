//! Quantities shown to people.

/// Bytes in binary units, e.g. `2.00 GiB`.
pub fn human_bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}
