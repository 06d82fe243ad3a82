//! Throughput and memory of the AWS offer-file parser on a file the size of a real
//! per-region EC2 offer file.
//!
//! The file (`--mb N` or FLUIDCLOUD_BENCH_MB, default 500 MB) has the real shape: products of many
//! instance types across regions, operating systems, tenancies, pre-installed software and
//! capacity statuses, then on-demand and reserved terms for every product. Generation and
//! parsing each run in a child process of this one: Linux carries the peak RSS across
//! `execve`, so a process started by cargo would report cargo's peak, and generating in the
//! measuring process would count the generator.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::Parser;
use fluidcloud::broker::pricing;
use fluidcloud::config::{PricingFormat, PricingSource};

#[path = "common/mod.rs"]
mod common;

const GENERATE_ENV: &str = "FLUIDCLOUD_BENCH_GENERATE";
const PARSE_ENV: &str = "FLUIDCLOUD_BENCH_PARSE";
const SIZE_ENV: &str = "FLUIDCLOUD_BENCH_MB";
const TARGET_REGION: &str = "eu-central-1";
const TARGET_MB_PER_S: f64 = 50.0;
const TARGET_RSS_MIB: f64 = 150.0;

/// Throughput and peak memory of the AWS offer-file parser.
#[derive(Parser, Debug)]
#[command(
    name = "aws_offer_parse",
    bin_name = "cargo bench --bench aws_offer_parse --"
)]
struct Args {
    /// The offer file's size in MB.
    #[arg(long, env = SIZE_ENV, default_value_t = 500, value_parser = common::at_least_one::<u64>)]
    mb: u64,
    /// (The child that writes the file.)
    #[arg(long, env = GENERATE_ENV, hide = true, conflicts_with = "parse")]
    generate: Option<PathBuf>,
    /// (The child that parses the file.)
    #[arg(long, env = PARSE_ENV, hide = true)]
    parse: Option<PathBuf>,
    #[command(flatten)]
    cargo: common::CargoBench,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mb = args.mb;
    let result = if let Some(path) = &args.generate {
        generate(path, mb * 1_000_000).map_err(|e| format!("generating: {e}").into())
    } else if let Some(path) = &args.parse {
        measure(path)
    } else {
        orchestrate(mb)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aws_offer_parse: {e}");
            ExitCode::FAILURE
        }
    }
}

fn orchestrate(mb: u64) -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("index.json");
    let started = Instant::now();
    run_child(GENERATE_ENV, &path, mb)?;
    println!(
        "generated {:.1} MB offer file in {:.1} s",
        std::fs::metadata(&path)?.len() as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    run_child(PARSE_ENV, &path, mb)
}

fn run_child(role: &str, path: &Path, mb: u64) -> Result<(), Box<dyn std::error::Error>> {
    let status = Command::new(std::env::current_exe()?)
        .env(role, path)
        .env(SIZE_ENV, mb.to_string())
        .status()?;
    if !status.success() {
        return Err(format!("the {role} child failed: {status}").into());
    }
    Ok(())
}

/// Parses the file through the public poller, as the daemon does, and prints the figures.
fn measure(path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let size = std::fs::metadata(path)?.len();
    let source = PricingSource {
        format: PricingFormat::Aws,
        url: format!("file://{}", path.display()),
        schedule: "0 0 * * * *".to_string(),
        ttl: Duration::from_secs(3600),
        max_age: Duration::from_secs(86_400),
        timeout: Duration::from_secs(3600),
        max_bytes: size,
        catalogue_provider: "aws".to_string(),
        feed_region: TARGET_REGION.to_string(),
        currency: "USD".to_string(),
        storage_price_per_gib_month: None,
        egress_price_per_gib: None,
        max_price_per_hour: 1_000.0,
        max_price_drop_ratio: 0.5,
        price_drop_confirmations: 3,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = reqwest::Client::new();
    let cache = path.with_file_name("cache");
    let rss_before = peak_rss_mib();
    let started = Instant::now();
    let outcome = runtime.block_on(pricing::poll("aws", &source, &client, &cache))?;
    let seconds = started.elapsed().as_secs_f64();
    let rss_peak = peak_rss_mib();

    let mb_read = outcome.bytes_read as f64 / 1e6;
    let rate = mb_read / seconds;
    println!("size:        {mb_read:.1} MB");
    println!("time:        {seconds:.2} s");
    println!("throughput:  {rate:.1} MB/s (target >= {TARGET_MB_PER_S})");
    println!(
        "offers:      {} for {TARGET_REGION} ({} rejected)",
        outcome.offers.len(),
        outcome.rejected.len()
    );
    println!("peak RSS:    {rss_peak:.1} MiB (target < {TARGET_RSS_MIB}; {rss_before:.1} MiB before parsing)");
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "targets:     throughput {}, memory {}",
        verdict(rate >= TARGET_MB_PER_S),
        verdict(rss_peak < TARGET_RSS_MIB)
    );
    Ok(())
}

/// Peak resident set size of this process so far, in MiB.
fn peak_rss_mib() -> f64 {
    // SAFETY: getrusage only writes into the zeroed struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return f64::NAN;
        }
        usage
    };
    // Linux reports kibibytes.
    usage.ru_maxrss as f64 / 1024.0
}

const REGIONS: &[(&str, &str, &str)] = &[
    ("us-east-1", "US East (N. Virginia)", "USE1"),
    ("us-east-2", "US East (Ohio)", "USE2"),
    ("us-west-1", "US West (N. California)", "USW1"),
    ("us-west-2", "US West (Oregon)", "USW2"),
    ("ca-central-1", "Canada (Central)", "CAN1"),
    ("eu-central-1", "EU (Frankfurt)", "EUC1"),
    ("eu-central-2", "EU (Zurich)", "EUC2"),
    ("eu-west-1", "EU (Ireland)", "EU"),
    ("eu-west-2", "EU (London)", "EUW2"),
    ("eu-west-3", "EU (Paris)", "EUW3"),
    ("eu-north-1", "EU (Stockholm)", "EUN1"),
    ("eu-south-1", "EU (Milan)", "EUS1"),
    ("ap-northeast-1", "Asia Pacific (Tokyo)", "APN1"),
    ("ap-northeast-2", "Asia Pacific (Seoul)", "APN2"),
    ("ap-southeast-1", "Asia Pacific (Singapore)", "APS1"),
    ("ap-southeast-2", "Asia Pacific (Sydney)", "APS2"),
    ("ap-south-1", "Asia Pacific (Mumbai)", "APS3"),
    ("sa-east-1", "South America (Sao Paulo)", "SAE1"),
    ("me-central-1", "Middle East (UAE)", "MEC1"),
    ("af-south-1", "Africa (Cape Town)", "AFS1"),
];
const CAPACITY: &[&str] = &[
    "Used",
    "UnusedCapacityReservation",
    "AllocatedCapacityReservation",
];
const SOFTWARE: &[&str] = &["NA", "SQL Std", "SQL Web", "SQL Ent"];
const TENANCY: &[&str] = &["Shared", "Dedicated", "Host"];
const SYSTEMS: &[&str] = &[
    "Linux",
    "Windows",
    "RHEL",
    "SUSE",
    "Red Hat Enterprise Linux with HA",
    "Ubuntu Pro",
];
/// Family and GiB of memory per vCPU.
const FAMILIES: &[(&str, u32)] = &[
    ("m5", 4),
    ("m5a", 4),
    ("m5d", 4),
    ("m6i", 4),
    ("m6a", 4),
    ("m6g", 4),
    ("m7i", 4),
    ("m7g", 4),
    ("c5", 2),
    ("c5a", 2),
    ("c6i", 2),
    ("c6a", 2),
    ("c6g", 2),
    ("c7i", 2),
    ("c7g", 2),
    ("c7a", 2),
    ("r5", 8),
    ("r5a", 8),
    ("r6i", 8),
    ("r6a", 8),
    ("r6g", 8),
    ("r7i", 8),
    ("r7g", 8),
    ("r7a", 8),
    ("t3", 4),
    ("t3a", 4),
    ("t4g", 4),
    ("i3", 8),
    ("i4i", 8),
    ("x2idn", 16),
    ("z1d", 8),
    ("d3", 8),
];
const SIZES: &[(&str, u32)] = &[
    ("large", 2),
    ("xlarge", 4),
    ("2xlarge", 8),
    ("4xlarge", 16),
    ("8xlarge", 32),
    ("12xlarge", 48),
    ("16xlarge", 64),
    ("24xlarge", 96),
];
const RESERVED_TERMS: &[(&str, &str, &str, &str)] = &[
    ("4NA7Y494T4", "1yr", "standard", "No Upfront"),
    ("HU7G6KETJZ", "1yr", "standard", "Partial Upfront"),
    ("6QCMYABX3D", "1yr", "standard", "All Upfront"),
    ("38NPMPTW36", "3yr", "standard", "Partial Upfront"),
    ("NQ3QZPMQV9", "3yr", "standard", "All Upfront"),
    ("BPH4J8HBKS", "3yr", "standard", "No Upfront"),
];

/// One product, derived from its index alone so the three passes over the products agree.
/// The index runs fastest over instance types, then regions, so every region gets every
/// instance type as Linux/Shared/NA/Used before any other combination.
struct Sku {
    id: String,
    instance_type: String,
    vcpus: u32,
    memory_gib: u32,
    region: (&'static str, &'static str, &'static str),
    os: &'static str,
    tenancy: &'static str,
    software: &'static str,
    capacity: &'static str,
    price: f64,
}

fn sku(index: u64) -> Sku {
    let types = (FAMILIES.len() * SIZES.len()) as u64;
    let t = index % types;
    let mut combo = index / types;
    let mut pick = |n: usize| {
        let i = (combo % n as u64) as usize;
        combo /= n as u64;
        i
    };
    let region = REGIONS[pick(REGIONS.len())];
    let capacity = CAPACITY[pick(CAPACITY.len())];
    let software = SOFTWARE[pick(SOFTWARE.len())];
    let tenancy = TENANCY[pick(TENANCY.len())];
    let os = SYSTEMS[pick(SYSTEMS.len())];
    let (family, gib_per_vcpu) = FAMILIES[(t / SIZES.len() as u64) as usize];
    let (size, vcpus) = SIZES[(t % SIZES.len() as u64) as usize];
    let os_factor = if os == "Linux" { 1.0 } else { 1.8 };
    Sku {
        id: sku_id(index),
        instance_type: format!("{family}.{size}"),
        vcpus,
        memory_gib: vcpus * gib_per_vcpu,
        region,
        os,
        tenancy,
        software,
        capacity,
        price: 0.012 * vcpus as f64 * gib_per_vcpu as f64 / 2.0 * os_factor,
    }
}

/// A 16-character SKU like AWS's, unique per index.
fn sku_id(index: u64) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    // splitmix64 scrambles the index; the low bits still encode it, so ids stay unique.
    let mut z = index.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    let mut id = String::with_capacity(16);
    let mut low = index;
    for i in 0..16 {
        let digit = if i < 6 {
            let d = (z & 31) as usize;
            z >>= 5;
            d
        } else {
            let d = (low & 31) as usize;
            low >>= 5;
            d
        };
        id.push(ALPHABET[digit] as char);
    }
    id
}

fn write_product(w: &mut impl Write, s: &Sku) -> io::Result<()> {
    let (code, location, prefix) = s.region;
    write!(
        w,
        r#"    "{id}" : {{
      "sku" : "{id}",
      "productFamily" : "Compute Instance",
      "attributes" : {{
        "servicecode" : "AmazonEC2",
        "location" : "{location}",
        "locationType" : "AWS Region",
        "instanceType" : "{it}",
        "currentGeneration" : "Yes",
        "instanceFamily" : "General purpose",
        "vcpu" : "{vcpus}",
        "physicalProcessor" : "Intel Xeon Platinum 8375C (Ice Lake)",
        "clockSpeed" : "3.5 GHz",
        "memory" : "{mem} GiB",
        "storage" : "EBS only",
        "networkPerformance" : "Up to 12500 Megabit",
        "processorArchitecture" : "64-bit",
        "tenancy" : "{tenancy}",
        "operatingSystem" : "{os}",
        "licenseModel" : "No License required",
        "usagetype" : "{prefix}-BoxUsage:{it}",
        "operation" : "RunInstances",
        "availabilityzone" : "NA",
        "capacitystatus" : "{capacity}",
        "classicnetworkingsupport" : "false",
        "dedicatedEbsThroughput" : "Up to 10000 Mbps",
        "ecu" : "NA",
        "enhancedNetworkingSupported" : "Yes",
        "gpuMemory" : "NA",
        "intelAvxAvailable" : "Yes",
        "intelAvx2Available" : "Yes",
        "intelTurboAvailable" : "Yes",
        "marketoption" : "OnDemand",
        "normalizationSizeFactor" : "4",
        "preInstalledSw" : "{sw}",
        "processorFeatures" : "Intel AVX; Intel AVX2; Intel AVX512; Intel Turbo",
        "regionCode" : "{code}",
        "servicename" : "Amazon Elastic Compute Cloud",
        "vpcnetworkingsupport" : "true"
      }}
    }}"#,
        id = s.id,
        it = s.instance_type,
        vcpus = s.vcpus,
        mem = s.memory_gib,
        tenancy = s.tenancy,
        os = s.os,
        capacity = s.capacity,
        sw = s.software,
    )
}

fn write_dimension(
    w: &mut impl Write,
    rate: &str,
    description: &str,
    unit: &str,
    usd: f64,
    last: bool,
) -> io::Result<()> {
    write!(
        w,
        r#"            "{rate}" : {{
              "rateCode" : "{rate}",
              "description" : "{description}",
              "beginRange" : "0",
              "endRange" : "Inf",
              "unit" : "{unit}",
              "pricePerUnit" : {{
                "USD" : "{usd:.10}"
              }},
              "appliesTo" : [ ]
            }}{comma}
"#,
        comma = if last { "" } else { "," }
    )
}

fn write_on_demand(w: &mut impl Write, s: &Sku) -> io::Result<()> {
    let term = format!("{}.JRTCKXETXF", s.id);
    writeln!(
        w,
        r#"    "{id}" : {{
      "{term}" : {{
        "offerTermCode" : "JRTCKXETXF",
        "sku" : "{id}",
        "effectiveDate" : "2025-11-01T00:00:00Z",
        "priceDimensions" : {{"#,
        id = s.id
    )?;
    let description = format!(
        "${:.4} per On Demand {} {} Instance Hour",
        s.price, s.os, s.instance_type
    );
    write_dimension(
        w,
        &format!("{term}.6YS6EN2CT7"),
        &description,
        "Hrs",
        s.price,
        true,
    )?;
    write!(
        w,
        r#"        }},
        "termAttributes" : {{ }}
      }}
    }}"#
    )
}

fn write_reserved(w: &mut impl Write, s: &Sku) -> io::Result<()> {
    writeln!(w, r#"    "{}" : {{"#, s.id)?;
    for (i, (code, length, class, option)) in RESERVED_TERMS.iter().enumerate() {
        let term = format!("{}.{code}", s.id);
        writeln!(
            w,
            r#"      "{term}" : {{
        "offerTermCode" : "{code}",
        "sku" : "{id}",
        "effectiveDate" : "2025-11-01T00:00:00Z",
        "priceDimensions" : {{"#,
            id = s.id
        )?;
        let discount = if *length == "1yr" { 0.62 } else { 0.41 };
        let upfront = s.price * discount * if *length == "1yr" { 8760.0 } else { 26280.0 };
        write_dimension(
            w,
            &format!("{term}.2TG2D8R56U"),
            "Upfront Fee",
            "Quantity",
            upfront,
            false,
        )?;
        let description = format!("{} {} reserved instance applied", s.os, s.instance_type);
        write_dimension(
            w,
            &format!("{term}.6YS6EN2CT7"),
            &description,
            "Hrs",
            s.price * discount,
            true,
        )?;
        write!(
            w,
            r#"        }},
        "termAttributes" : {{
          "LeaseContractLength" : "{length}",
          "OfferingClass" : "{class}",
          "PurchaseOption" : "{option}"
        }}
      }}{comma}
"#,
            comma = if i + 1 == RESERVED_TERMS.len() {
                ""
            } else {
                ","
            }
        )?;
    }
    write!(w, "    }}")
}

/// Writes an offer file of about `target_bytes` to `path`, streaming.
fn generate(path: &Path, target_bytes: u64) -> io::Result<()> {
    // One product's share of the file decides how many products make the target size.
    let mut sample = Vec::new();
    let first = sku(0);
    write_product(&mut sample, &first)?;
    write_on_demand(&mut sample, &first)?;
    write_reserved(&mut sample, &first)?;
    let count = (target_bytes / (sample.len() as u64 + 9)).max(1);

    let tmp = PathBuf::from(format!("{}.part", path.display()));
    let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
    write!(
        w,
        r#"{{
  "formatVersion" : "v1.0",
  "disclaimer" : "This pricing list is for informational purposes only.",
  "offerCode" : "AmazonEC2",
  "version" : "20251120120000",
  "publicationDate" : "2025-11-20T12:00:00Z",
  "products" : {{
"#
    )?;
    type Section = fn(&mut BufWriter<File>, &Sku) -> io::Result<()>;
    let sections: [(&str, Section); 3] = [
        ("", write_product),
        ("  \"terms\" : {\n    \"OnDemand\" : {\n", write_on_demand),
        ("    \"Reserved\" : {\n", write_reserved),
    ];
    for (n, (opening, section)) in sections.iter().enumerate() {
        w.write_all(opening.as_bytes())?;
        for i in 0..count {
            section(&mut w, &sku(i))?;
            w.write_all(if i + 1 == count { b"\n" } else { b",\n" })?;
        }
        w.write_all(match n {
            0 => b"  },\n".as_slice(),
            1 => b"    },\n".as_slice(),
            _ => b"    }\n  },\n".as_slice(),
        })?;
    }
    write!(
        w,
        r#"  "attributesList" : {{
    "capacitystatus" : [ "Used", "UnusedCapacityReservation", "AllocatedCapacityReservation" ]
  }}
}}
"#
    )?;
    w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(tmp, path)
}
