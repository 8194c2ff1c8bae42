//! Who a job belongs to. A job records the login that submitted it (`session_user`) and, when the
//! session names one, a tenant label: the setting `stageflow.tenant`, which any role may set for
//! itself. The label narrows a login's own jobs (the HTTP API sets it per request from the token
//! it was given); it never widens what a login sees. The checks are SQL (`stageflow._access`);
//! this module defines the setting and reads it, refusing a label that is not one.

use std::ffi::CString;

use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PgSqlErrorCode};

static TENANT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// The longest tenant label.
const MAX_TENANT_LEN: usize = 100;

/// Defines `stageflow.tenant` (any role, for its own session).
pub fn init() {
    GucRegistry::define_string_guc(
        c"stageflow.tenant",
        c"The tenant label this session submits and sees jobs under; empty: none.",
        c"A label within the login: set, the session sees only its login's jobs of this tenant.",
        &TENANT,
        GucContext::Userset,
        GucFlags::default(),
    );
}

/// Whether `label` is a tenant label: 1 to 100 ASCII letters, digits, '.', '_', ':', '@' or '-',
/// starting with a letter or digit.
fn is_label(label: &str) -> bool {
    label.len() <= MAX_TENANT_LEN
        && label.starts_with(|c: char| c.is_ascii_alphanumeric())
        && label.chars().all(|c| c.is_ascii_alphanumeric() || ".:_@-".contains(c))
}

/// The session's tenant label, or NULL when `stageflow.tenant` is unset or empty.
#[pg_extern(stable, parallel_safe, name = "_tenant")]
fn tenant() -> Option<String> {
    let label = TENANT.get().and_then(|value| value.into_string().ok()).filter(|value| !value.is_empty())?;
    if !is_label(&label) {
        crate::raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("stageflow.tenant {label:?} is not a tenant label"),
            "a tenant label is 1 to 100 letters, digits, '.', '_', ':', '@' or '-', starting with a letter or digit",
        );
    }
    Some(label)
}

#[cfg(test)]
mod unit {
    use super::is_label;

    #[test]
    fn labels() {
        assert!(is_label("acme"));
        assert!(is_label("team-7.geo:prod@eu_west"));
        assert!(!is_label(""));
        assert!(!is_label("-acme"));
        assert!(!is_label("ac me"));
        assert!(!is_label("acmé"));
        assert!(!is_label(&"a".repeat(101)));
        assert!(is_label(&"a".repeat(100)));
    }
}
