//! Adapters for clients on an older schema: the legacy v1 API upgraded to OIP v2
//! ([`v1`]), and requests for one version of a model turned into requests for another
//! ([`version`]). Pure functions over domain types; the edges call them.

pub mod v1;
pub mod version;
