//! The pre-shared key, the challenge-response proofs and the per-frame MAC.

use std::fmt;
use std::path::Path;

use super::ViaductError;

const KEY_CONTEXT: &str = "fluidcloud viaduct 2026-11 pre-shared key";
const SESSION_CONTEXT: &str = "fluidcloud viaduct 2026-11 session key";
const SERVER_PROOF: &[u8] = b"fluidcloud-viaduct receiver proof";
const CLIENT_PROOF: &[u8] = b"fluidcloud-viaduct sender proof";

/// Shortest secret accepted: 32 bytes, as `viaduct serve --help` asks, so that a key file of
/// random bytes (or their hex) carries at least the 256 bits of the BLAKE3 key made from it.
const MIN_SECRET_BYTES: usize = 32;

/// Why a secret is refused as a pre-shared key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("the secret is {len} bytes long; at least {MIN_SECRET_BYTES} are required")]
    TooShort { len: usize },
}

/// The secret both ends of a viaduct hold. It is only ever used as a BLAKE3 key; it never
/// travels.
#[derive(Clone)]
pub struct PresharedKey([u8; 32]);

impl PresharedKey {
    /// Derives the key from a secret of at least 32 bytes (for example 32 random bytes,
    /// written as hex in a file).
    pub fn from_secret(secret: &[u8]) -> Result<Self, SecretError> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(SecretError::TooShort { len: secret.len() });
        }
        Ok(PresharedKey(blake3::derive_key(KEY_CONTEXT, secret)))
    }

    /// Reads the secret from a file (trailing whitespace is ignored), under the rule of every
    /// secret file: one that other users can access is refused.
    pub fn from_file(path: &Path) -> Result<Self, ViaductError> {
        let err = |detail: String| ViaductError::Key {
            path: path.to_path_buf(),
            detail,
        };
        let bytes =
            crate::sys::secret::read(path, "the key file").map_err(|e| err(e.to_string()))?;
        Self::from_secret(&bytes).map_err(|e| err(e.to_string()))
    }

    /// A fresh random key, for tests and for generating a secret to distribute.
    pub fn random() -> Self {
        PresharedKey(random_bytes())
    }

    pub(crate) fn server_proof(
        &self,
        client_nonce: &[u8; 32],
        server_nonce: &[u8; 32],
    ) -> blake3::Hash {
        self.proof(SERVER_PROOF, client_nonce, server_nonce)
    }

    pub(crate) fn client_proof(
        &self,
        client_nonce: &[u8; 32],
        server_nonce: &[u8; 32],
    ) -> blake3::Hash {
        self.proof(CLIENT_PROOF, client_nonce, server_nonce)
    }

    fn proof(&self, role: &[u8], cn: &[u8; 32], sn: &[u8; 32]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(role);
        h.update(cn);
        h.update(sn);
        h.finalize()
    }

    /// The key for one connection's MACs: fresh nonces on both sides make every connection's
    /// key different, so frames cannot be replayed from one connection into another.
    pub(crate) fn session(&self, client_nonce: &[u8; 32], server_nonce: &[u8; 32]) -> SessionKey {
        let mut material = [0u8; 96];
        material[..32].copy_from_slice(&self.0);
        material[32..64].copy_from_slice(client_nonce);
        material[64..].copy_from_slice(server_nonce);
        SessionKey(blake3::derive_key(SESSION_CONTEXT, &material))
    }
}

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresharedKey(<redacted>)")
    }
}

/// The MAC key of one connection.
#[derive(Clone)]
pub(crate) struct SessionKey([u8; 32]);

impl SessionKey {
    /// A keyed hasher primed with what binds a frame to its place in the connection.
    pub fn mac(&self, direction: u8, seq: u64) -> blake3::Hasher {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(&[direction]);
        h.update(&seq.to_le_bytes());
        h
    }
}

/// Random bytes from the operating system. Failing to get them leaves nothing safe to do.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    if let Err(e) = getrandom::fill(&mut b) {
        panic!("the operating system's random number generator failed: {e}");
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_depend_on_key_role_and_nonces() {
        let k = PresharedKey::from_secret(b"0123456789abcdef0123456789abcdef").unwrap();
        let other = PresharedKey::from_secret(b"0123456789abcdef0123456789abcdeF").unwrap();
        let (a, b) = ([1u8; 32], [2u8; 32]);
        assert_eq!(k.server_proof(&a, &b), k.server_proof(&a, &b));
        assert_ne!(k.server_proof(&a, &b), other.server_proof(&a, &b));
        assert_ne!(k.server_proof(&a, &b), k.client_proof(&a, &b));
        assert_ne!(k.server_proof(&a, &b), k.server_proof(&b, &a));
    }

    #[test]
    fn short_secret_refused() {
        let e = PresharedKey::from_secret(b"short").unwrap_err();
        assert_eq!(e, SecretError::TooShort { len: 5 });
        assert!(e.to_string().contains("at least 32"), "{e}");
    }

    #[test]
    fn a_secret_of_16_bytes_is_refused_as_the_help_says() {
        let e = PresharedKey::from_secret(b"0123456789abcdef").unwrap_err();
        assert!(e.to_string().contains("16 bytes long; at least 32"), "{e}");
        let e = PresharedKey::from_secret(&[7u8; 31]).unwrap_err();
        assert!(e.to_string().contains("at least 32"), "{e}");
        assert!(PresharedKey::from_secret(&[7u8; 32]).is_ok());
    }

    #[test]
    fn key_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        std::fs::write(&p, "0123456789abcdef0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = PresharedKey::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("open to other users"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let k = PresharedKey::from_file(&p).unwrap();
        let direct = PresharedKey::from_secret(b"0123456789abcdef0123456789abcdef0123").unwrap();
        assert_eq!(
            k.0, direct.0,
            "the trailing newline is not part of the secret"
        );
    }
}
