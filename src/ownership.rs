//! Who a job belongs to. A job records the login that submitted it (`session_user`) and, when the
//! session names one, a tenant label: the setting `stageflow.tenant`, which any role may set for
//! itself. The label narrows a login's own jobs (the HTTP API sets it per request from the token
//! it was given); it never widens what a login sees. The checks are SQL (`stageflow._access`);
//! this module defines the setting and reads it, refusing a label that is not one, and answers
//! whether the session's login is an admin ([`session_is_admin`]), which every claim asks.

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

/// `stageflow._session_is_admin()`: whether the session's login (`session_user`, whatever `SET
/// ROLE` says) is a superuser or a member of `stageflow_admin`, directly or through other roles.
/// In Rust because every claim asks it: a SQL function with a subquery is not inlined and is
/// planned again in each transaction (about 100 µs a call, measured); this reads the role
/// caches.
#[pg_extern(stable, parallel_safe, name = "_session_is_admin")]
fn session_is_admin() -> bool {
    // SAFETY: plain reads of the backend's session state and role caches, on the backend's one
    // thread inside a transaction (a SQL function call); the role name is a static C string and
    // get_role_oid returns InvalidOid for a missing role instead of raising (missing_ok).
    unsafe {
        let session = pg_sys::GetSessionUserId();
        let admin = pg_sys::get_role_oid(c"stageflow_admin".as_ptr(), true);
        // is_member_of_role counts a superuser as a member of every role.
        pg_sys::superuser_arg(session) || (admin != pg_sys::InvalidOid && pg_sys::is_member_of_role(session, admin))
    }
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
