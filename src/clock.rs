//! The engine's test clock. `stageflow.now()` (SQL, so that PostgreSQL inlines it into the
//! statements that read it) is the transaction's time unless the setting `stageflow.fake_now` holds
//! a timestamp: tests move time forward with it instead of sleeping. The setting decides lease
//! expiry, retries, deadlines and retention for every job, so only a superuser may set it: it is
//! defined here with a superuser-only context, and the `stageflow.` prefix is reserved, so no
//! other role can define or set it. `stageflow.now()` reads it through [`fake_now`], a function of
//! this library: the first read in a session loads the library, and PostgreSQL then drops (with a
//! WARNING) a value a non-superuser had set before the setting was defined.

use std::ffi::CString;

use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

static FAKE_NOW: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// Defines `stageflow.fake_now` (superuser only).
pub fn init() {
    GucRegistry::define_string_guc(
        c"stageflow.fake_now",
        c"A timestamp the engine takes for the current time (tests only); empty: the real time.",
        c"Only a superuser may set it: it decides lease expiry, retries, deadlines and retention.",
        &FAKE_NOW,
        GucContext::Suset,
        GucFlags::default(),
    );
}

/// The text of `stageflow.fake_now`, or NULL when it is unset or empty.
#[pg_extern(stable, parallel_safe, name = "_fake_now")]
fn fake_now() -> Option<String> {
    FAKE_NOW.get().and_then(|value| value.into_string().ok()).filter(|value| !value.is_empty())
}
