//! Names of services, volumes, buckets and apps, and object keys: the rules live in
//! [`crate::model::names`], shared with the configuration's checks.

pub use crate::model::names::{validate_file_name, validate_key, validate_name};
