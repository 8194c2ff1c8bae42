//! GDAL's virtual file system for the paths a task names: `s3://bucket/key` is GDAL's
//! `/vsis3/bucket/key`, anything else a local path. Whole-file reads and writes, sizes and
//! listings, for local paths and S3 objects alike.

use std::ffi::{CStr, CString};
use std::path::Path;

use stageflow_worker::TaskError;

/// The path GDAL opens for a location: `s3://bucket/key` becomes `/vsis3/bucket/key` (GDAL's S3
/// reader, configured from the same AWS_* variables as the inventory's object store: see
/// [`configure_s3`]); anything else is a local path and stays as it is.
pub fn gdal_path(location: &str) -> Result<String, TaskError> {
    match location.strip_prefix("s3://") {
        Some(rest) => {
            let bucket = rest.split('/').next().unwrap_or_default();
            if bucket.is_empty() {
                return Err(TaskError::permanent("bad_url", format!("{location}: no bucket")));
            }
            configure_s3();
            Ok(format!("/vsis3/{}", rest.trim_end_matches('/')))
        }
        None => Ok(location.to_owned()),
    }
}

/// Points GDAL's S3 client at `AWS_ENDPOINT` (or `AWS_ENDPOINT_URL`) when one is set, as
/// object_store does: path-style addressing, and plain HTTP for an `http://` endpoint. Writing a
/// COG to S3 needs a local temporary file (GDAL writes TIFFs out of order). Once per process.
fn configure_s3() {
    static CONFIGURED: std::sync::Once = std::sync::Once::new();
    CONFIGURED.call_once(|| {
        let _ = gdal::config::set_config_option("CPL_VSIL_USE_TEMP_FILE_FOR_RANDOM_WRITE", "YES");
        let endpoint = std::env::var("AWS_ENDPOINT").or_else(|_| std::env::var("AWS_ENDPOINT_URL"));
        if let Ok(endpoint) = endpoint {
            let (https, host) = match endpoint.split_once("://") {
                Some((scheme, host)) => (scheme != "http", host.trim_end_matches('/')),
                None => (true, endpoint.trim_end_matches('/')),
            };
            let _ = gdal::config::set_config_option("AWS_S3_ENDPOINT", host);
            let _ = gdal::config::set_config_option("AWS_HTTPS", if https { "YES" } else { "NO" });
            let _ = gdal::config::set_config_option("AWS_VIRTUAL_HOSTING", "FALSE");
        }
    });
}

/// Whether a path exists, for local paths and GDAL's virtual ones (`/vsis3/...`) alike.
pub fn exists(path: &str) -> bool {
    if !path.starts_with("/vsi") {
        return Path::new(path).exists();
    }
    let Ok(c_path) = CString::new(path) else { return false };
    // Opened and closed rather than VSIStatL'd: the prebuilt bindings' stat buffer is not to be
    // trusted to match this libc's.
    // SAFETY: c_path is a NUL-terminated string that outlives the calls; the handle VSIFOpenL returns is
    // checked for NULL and closed exactly once.
    unsafe {
        let file = gdal_sys::VSIFOpenL(c_path.as_ptr(), c"rb".as_ptr());
        if file.is_null() {
            return false;
        }
        gdal_sys::VSIFCloseL(file);
    }
    true
}

/// Writes a whole file at a local path or a GDAL virtual one (`/vsis3/...`).
pub fn write_file(path: &str, bytes: &[u8]) -> Result<(), TaskError> {
    if !path.starts_with("/vsi") {
        if let Some(parent) = Path::new(path).parent() {
            std::fs::create_dir_all(parent).map_err(|e| crate::io_error(path, &e))?;
        }
        return std::fs::write(path, bytes).map_err(|e| crate::io_error(path, &e));
    }
    let c_path = CString::new(path).map_err(|_| TaskError::permanent("bad_params", "NUL in a path"))?;
    // SAFETY: c_path is NUL-terminated and outlives the calls; the handle is checked for NULL, written
    // from a slice of exactly bytes.len() bytes and closed exactly once.
    unsafe {
        let file = gdal_sys::VSIFOpenL(c_path.as_ptr(), c"wb".as_ptr());
        if file.is_null() {
            return Err(TaskError::retryable("io", format!("opening {path}: {}", last_gdal_error())));
        }
        let written = gdal_sys::VSIFWriteL(bytes.as_ptr().cast(), 1, bytes.len(), file);
        let closed = gdal_sys::VSIFCloseL(file);
        if written != bytes.len() || closed != 0 {
            return Err(TaskError::retryable("io", format!("writing {path}: {}", last_gdal_error())));
        }
    }
    Ok(())
}

/// Reads a whole file of at most `max` bytes; `None` when it does not exist (or cannot be
/// opened), an error when it is longer or cannot be read whole.
pub fn read_file(path: &str, max: usize) -> Result<Option<Vec<u8>>, TaskError> {
    // (GDAL opens local paths too)
    let c_path = CString::new(path).map_err(|_| TaskError::permanent("bad_params", "NUL in a path"))?;
    // SAFETY: c_path is NUL-terminated and outlives the calls; the handle is checked for NULL, read
    // into a buffer of exactly `size` bytes (bytes.len()) and closed exactly once.
    unsafe {
        let file = gdal_sys::VSIFOpenL(c_path.as_ptr(), c"rb".as_ptr());
        if file.is_null() {
            return Ok(None);
        }
        let size = (gdal_sys::VSIFSeekL(file, 0, SEEK_END) == 0).then(|| gdal_sys::VSIFTellL(file));
        let outcome = match size.and_then(|size| usize::try_from(size).ok()) {
            None => Err(TaskError::retryable("io", format!("reading {path}: {}", last_gdal_error()))),
            Some(size) if size > max => Err(TaskError::permanent("io", format!("{path} is over {max} bytes"))),
            Some(size) => {
                let mut bytes = vec![0u8; size];
                let read = if gdal_sys::VSIFSeekL(file, 0, SEEK_SET) == 0 {
                    gdal_sys::VSIFReadL(bytes.as_mut_ptr().cast(), 1, bytes.len(), file)
                } else {
                    0
                };
                if read == size {
                    Ok(Some(bytes))
                } else {
                    Err(TaskError::retryable("io", format!("reading {path}: {}", last_gdal_error())))
                }
            }
        };
        gdal_sys::VSIFCloseL(file);
        outcome
    }
}

/// The size of a file (an S3 object: its Content-Length, asked afresh), `None` when it cannot be
/// opened (a missing object, or an S3 prefix).
pub fn size(path: &Path) -> Option<u64> {
    let Some(path) = path.to_str().filter(|p| p.starts_with("/vsi")) else {
        return std::fs::metadata(path).ok().filter(|m| m.is_file()).map(|m| m.len());
    };
    // What GDAL remembers of the object's directory goes first: a listing read before the object
    // was uploaded would say it does not exist (and a replaced object has another size).
    forget(path.rsplit_once('/').map_or(path, |(directory, _)| directory));
    let c_path = CString::new(path).ok()?;
    // SAFETY: c_path is NUL-terminated and outlives the calls; the handle is checked for NULL and
    // closed exactly once. (Seek to the end + tell rather than VSIStatL: see `exists`.)
    unsafe {
        let file = gdal_sys::VSIFOpenL(c_path.as_ptr(), c"rb".as_ptr());
        if file.is_null() {
            return None;
        }
        let sought = gdal_sys::VSIFSeekL(file, 0, SEEK_END);
        let size = gdal_sys::VSIFTellL(file);
        gdal_sys::VSIFCloseL(file);
        (sought == 0).then_some(size)
    }
}

/// SEEK_SET and SEEK_END, as C's stdio defines them (the bindings leave them out).
const SEEK_SET: std::ffi::c_int = 0;
const SEEK_END: std::ffi::c_int = 2;

/// The names directly in a directory (an S3 prefix: its objects and "subdirectories"), read
/// afresh (GDAL's cache of this prefix dropped first: another worker may have written since).
pub fn list(path: &str) -> Result<Vec<String>, TaskError> {
    if path.starts_with("/vsi") {
        forget(path);
    }
    match gdal::vsi::read_dir(path, false) {
        Ok(entries) => Ok(entries.into_iter().map(|p| p.to_string_lossy().into_owned()).collect()),
        // (GDAL says an empty or missing directory the same way)
        Err(_) => Ok(Vec::new()),
    }
}

/// Drops what GDAL's network file systems remember of the paths under `prefix` (existence,
/// sizes, listings), so that the next look reads the object store.
pub fn forget(prefix: &str) {
    if let Ok(c_prefix) = CString::new(prefix) {
        // SAFETY: c_prefix is NUL-terminated and outlives the call, which only reads it.
        unsafe { gdal_sys::VSICurlPartialClearCache(c_prefix.as_ptr()) };
    }
}

/// The last error GDAL raised on this thread.
pub(crate) fn last_gdal_error() -> String {
    // SAFETY: CPLGetLastErrorMsg never returns NULL: a NUL-terminated, thread-local buffer (empty when
    // there was no error), copied out at once.
    unsafe { CStr::from_ptr(gdal_sys::CPLGetLastErrorMsg()) }.to_string_lossy().into_owned()
}
