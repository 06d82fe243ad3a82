//! [`AppSpec`]: what a provider needs to run an app. The type is the model's; the
//! configuration reads it from an `app` component's `settings` when it is loaded.

pub use crate::config::SettingsError;
pub use crate::model::AppSpec;
