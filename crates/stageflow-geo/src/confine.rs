//! Where a geospatial job may read and write: the worker's confinement.
//!
//! A job's params name files, directories, S3 objects and tables, and the job was submitted by
//! someone else than the operator of the worker that runs it. The worker is configured with what
//! it may touch (`stageflow worker --geo-root DIR --geo-bucket s3://bucket/prefix --geo-schema
//! NAME`, or `STAGEFLOW_GEO_ROOTS`, `STAGEFLOW_GEO_BUCKETS`, `STAGEFLOW_GEO_SCHEMA`), and every
//! handler's params are checked against it before the handler runs ([`Confinement::check`]):
//!
//! - a local path is made absolute and canonical (symbolic links resolved; for an output that does
//!   not exist yet, its nearest existing ancestor) and must lie under one of the roots, which are
//!   canonical too; without a root, every local path is refused;
//! - an `s3://bucket/key` must lie under one of the buckets' prefixes (whole path segments; no `.`
//!   or `..` segment); without one, every S3 location is refused;
//! - anything else GDAL would open (`/vsicurl/...`, `/vsistdin/`, `GTIFF_RAW:...`, a URL) is
//!   refused: GDAL sees only plain paths under the roots and `/vsis3/` paths of allowed buckets;
//! - outputs never replace what this job did not write: an output directory or S3 prefix must be
//!   empty or carry this job's mark (a `.stageflow-job` file or object holding the job id, left by
//!   the job's first writer), an output file must not exist or carry the mark in its
//!   `user.stageflow.job` extended attribute;
//! - a table is in the configured schema (default `stageflow_geo`; a bare name is put there), and
//!   a job writes only into a table it created (`stage_vector` marks it: [`crate::db::table_mark`]);
//! - a file or S3 object read must fit the byte budget (`over_budget`);
//! - a raster is opened with the GeoTIFF driver only (VRT raw bands are off for the whole
//!   process) and its pixels (width x height x bands) must fit the worker's budget (else a
//!   permanent `over_budget` error).
//!
//! A refusal is a permanent error of category `forbidden_path`, naming the rule it broke.

use std::path::{Component, Path, PathBuf};

use serde_json::Value;
use stageflow_worker::{Task, TaskError};

/// The mark an output directory carries: a file holding the id of the job that writes into it.
pub const DIRECTORY_MARK: &str = ".stageflow-job";
/// The extended attribute an output file carries: the id of the job that wrote it.
pub const FILE_MARK: &str = "user.stageflow.job";
/// The default pixel budget of a raster a task opens: 4 gigapixels (a 65,536 x 65,536 scene).
pub const DEFAULT_MAX_PIXELS: u64 = 1 << 32;
/// The default byte budget of a file or S3 object a task reads: 16 GiB.
pub const DEFAULT_MAX_BYTES: u64 = 16 << 30;

/// What a worker's geospatial handlers may touch.
#[derive(Clone, Debug)]
pub struct Confinement {
    roots: Vec<PathBuf>,
    buckets: Vec<(String, String)>,
    schema: String,
    max_pixels: u64,
    max_bytes: u64,
}

/// How a handler uses one of its params.
#[derive(Clone, Copy, Debug)]
pub enum Use {
    /// A file or directory read (local or S3); a missing one is a `not_found` error.
    Read(&'static str),
    /// A file read whose absence the handler reports itself (a STAC document a link names).
    MaybeRead(&'static str),
    /// A raster read: as `Read`, and opened with the GeoTIFF driver within the pixel budget.
    Raster(&'static str),
    /// A directory (or S3 prefix) the task writes files into.
    OutputDirectory(&'static str),
    /// A file the task writes (local or S3).
    OutputFile(&'static str),
    /// A table `name` or `schema.name`.
    Table(&'static str),
    /// An object named relative to a location read (the first param, checked before): it must
    /// stay inside that location (a local symbolic link out of it is refused).
    Within(&'static str, &'static str),
}

fn forbidden(message: String) -> TaskError {
    TaskError::permanent("forbidden_path", message)
}

impl Confinement {
    /// `roots` must exist (they are made canonical here); `buckets` are `s3://bucket[/prefix]`;
    /// `schema` a plain identifier.
    pub fn new(roots: &[PathBuf], buckets: &[String], schema: &str, max_pixels: u64) -> Result<Self, String> {
        let roots = roots
            .iter()
            .map(|root| root.canonicalize().map_err(|e| format!("geo root {}: {e}", root.display())))
            .collect::<Result<Vec<_>, _>>()?;
        let buckets = buckets
            .iter()
            .map(|bucket| {
                let (name, key) =
                    split_s3(bucket).ok_or_else(|| format!("geo bucket {bucket:?} is not s3://bucket[/prefix]"))?;
                clean_key(&key).map_err(|e| format!("geo bucket {bucket}: {e}"))?;
                Ok((name, key.trim_end_matches('/').to_owned()))
            })
            .collect::<Result<Vec<_>, String>>()?;
        if !crate::db::plain_identifier(schema) {
            return Err(format!("geo schema {schema:?} is not a plain lowercase identifier"));
        }
        if max_pixels == 0 {
            return Err("the pixel budget must be at least 1".into());
        }
        Ok(Confinement { roots, buckets, schema: schema.to_owned(), max_pixels, max_bytes: DEFAULT_MAX_BYTES })
    }

    /// With a byte budget of `max_bytes` for each file or S3 object a task reads (a larger one is refused
    /// with `over_budget` before it is opened).
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes.max(1);
        self
    }

    /// Refuses a file over the byte budget: a local file (`canonical`), or an S3 object (GDAL's
    /// path for it). Directories and S3 prefixes are not measured.
    fn check_bytes(&self, location: &str, canonical: &Path) -> Result<(), TaskError> {
        match crate::vsi::size(canonical) {
            Some(size) if size > self.max_bytes => Err(TaskError::permanent(
                "over_budget",
                format!(
                    "{location} is {size} bytes, over this worker's budget of {} bytes for a file a task reads \
                     (stageflow worker --geo-max-bytes)",
                    self.max_bytes
                ),
            )),
            _ => Ok(()),
        }
    }

    /// The schema tables are confined to.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The pixel budget of a raster.
    pub fn max_pixels(&self) -> u64 {
        self.max_pixels
    }

    /// Checks the params a handler uses and returns the task with them rewritten to what was
    /// checked (canonical local paths, tables with their schema), or the refusal.
    pub fn check(&self, mut task: Task, uses: &[Use]) -> Result<Task, TaskError> {
        for usage in uses {
            let name = match usage {
                Use::Read(n)
                | Use::MaybeRead(n)
                | Use::Raster(n)
                | Use::OutputDirectory(n)
                | Use::OutputFile(n)
                | Use::Table(n) => *n,
                Use::Within(location, object) => {
                    let location = task.params[*location].as_str().unwrap_or_default().to_owned();
                    if let Some(object) = task.params[*object].as_str() {
                        self.within(&location, object)?;
                    }
                    continue;
                }
            };
            let Some(value) = task.params.get(name) else { continue };
            let Some(text) = value.as_str() else {
                return Err(TaskError::permanent("bad_params", format!("params.{name} must be a string")));
            };
            let checked = match usage {
                Use::Read(_) => self.read(text)?,
                Use::MaybeRead(_) => match self.read(text) {
                    Err(error) if error.kind == "not_found" => text.to_owned(),
                    other => other?,
                },
                Use::Raster(_) => {
                    let checked = self.read(text)?;
                    crate::raster::check_budget(&checked, self.max_pixels)?;
                    checked
                }
                Use::OutputDirectory(_) => self.output_directory(text, &task.job_id)?,
                Use::OutputFile(_) => self.output_file(text, &task.job_id)?,
                Use::Table(_) => self.table(text)?,
                Use::Within(..) => unreachable!("handled above"),
            };
            if let Some(params) = task.params.as_object_mut() {
                params.insert(name.to_owned(), Value::String(checked));
            }
        }
        Ok(task)
    }

    /// A location read: a canonical local path under a root, or an S3 location under a bucket.
    pub fn read(&self, location: &str) -> Result<String, TaskError> {
        if let Some(checked) = self.s3(location)? {
            self.check_bytes(location, Path::new(&crate::vsi::gdal_path(&checked)?))?;
            return Ok(checked);
        }
        let path = self.plain_path(location)?;
        match path.canonicalize() {
            Ok(canonical) => {
                self.under_root(location, &canonical)?;
                self.check_bytes(location, &canonical)?;
                Ok(canonical.to_string_lossy().into_owned())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Outside the roots, missing or not is not said (no probing of the file system).
                let mut existing = path.as_path();
                while !existing.exists() {
                    existing = existing.parent().unwrap_or(Path::new("/"));
                }
                let ancestor = existing.canonicalize().map_err(|e| crate::io_error(location, &e))?;
                self.under_root(location, &ancestor)?;
                Err(TaskError::permanent("not_found", format!("{location}: no such file or directory")))
            }
            Err(e) => Err(crate::io_error(location, &e)),
        }
    }

    /// An object relative to a checked location: an S3 key of clean segments, or a local path
    /// whose canonical form is inside the (canonical) location.
    fn within(&self, location: &str, object: &str) -> Result<(), TaskError> {
        if location.is_empty() {
            return Err(TaskError::permanent("bad_params", format!("{object}: no source to read it from")));
        }
        if location.starts_with("s3://") {
            clean_key(object).map_err(|e| forbidden(format!("{object}: {e}")))?;
            let gdal = crate::vsi::gdal_path(&format!("{}/{object}", location.trim_end_matches('/')))?;
            return self.check_bytes(object, Path::new(&gdal));
        }
        let base = Path::new(location);
        let joined = base.join(object);
        let canonical = joined.canonicalize().map_err(|e| crate::io_error(&joined.to_string_lossy(), &e))?;
        if !canonical.starts_with(base) {
            return Err(forbidden(format!(
                "{object} leads out of {location} (to {}): links out of a source are not followed",
                canonical.display()
            )));
        }
        self.check_bytes(object, &canonical)
    }

    /// A directory (or S3 prefix) the task writes into: under a root (created if need be) or an
    /// allowed bucket prefix, empty or marked as this job's (the mark is left there).
    pub fn output_directory(&self, location: &str, job_id: &str) -> Result<String, TaskError> {
        if let Some(checked) = self.s3(location)? {
            let prefix = crate::vsi::gdal_path(&checked)?;
            let mark = format!("{prefix}/{DIRECTORY_MARK}");
            // (a read that fails is an error worth a retry, not a missing mark; an empty mark is one
            // being written by a task of the same job at this instant: read again, a little later)
            let owner = || {
                for _ in 0..20 {
                    crate::vsi::forget(&mark);
                    match crate::vsi::read_file(&mark, 256)? {
                        Some(id) if id.iter().all(u8::is_ascii_whitespace) => {
                            std::thread::sleep(std::time::Duration::from_millis(50))
                        }
                        read => return Ok(read.map(|id| String::from_utf8_lossy(&id).trim().to_owned())),
                    }
                }
                Err(TaskError::retryable("io", format!("{location}: its mark {DIRECTORY_MARK} stays empty")))
            };
            let others = || Ok(crate::vsi::list(&prefix)?.iter().any(|name| name != DIRECTORY_MARK));
            // (a PUT replaces an object whole: a racing task of the same job reads the mark whole or
            // not at all. Two different jobs creating the same new prefix at the same instant both
            // write a mark; the one read back decides, so at most the tasks already past this check
            // write.)
            let write = || {
                crate::vsi::write_file(&mark, job_id.as_bytes())?;
                owner()
            };
            claim_directory(location, job_id, owner, others, write)?;
            return Ok(checked);
        }
        let path = self.output_path(location)?;
        std::fs::create_dir_all(&path).map_err(|e| crate::io_error(location, &e))?;
        let canonical = path.canonicalize().map_err(|e| crate::io_error(location, &e))?;
        self.under_root(location, &canonical)?;
        let mark = canonical.join(DIRECTORY_MARK);
        let owner = || Ok(std::fs::read_to_string(&mark).ok().map(|owner| owner.trim().to_owned()));
        let others = || {
            let entries = std::fs::read_dir(&canonical).map_err(|e| crate::io_error(location, &e))?;
            Ok(entries
                .filter_map(Result::ok)
                .any(|entry| !entry.file_name().to_string_lossy().starts_with(DIRECTORY_MARK)))
        };
        // Written whole, then linked into place (a link never replaces a name): of two jobs racing
        // for a new directory one gets the mark, and a task of the same job reads it whole or not
        // at all.
        let write = || {
            let partial = canonical.join(format!("{DIRECTORY_MARK}.{}.{}", std::process::id(), task_suffix()));
            std::fs::write(&partial, job_id).map_err(|e| crate::io_error(&partial.to_string_lossy(), &e))?;
            let linked = std::fs::hard_link(&partial, &mark);
            let _ = std::fs::remove_file(&partial);
            match linked {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    Err(crate::io_error(&mark.to_string_lossy(), &e))
                }
                _ => owner(),
            }
        };
        claim_directory(location, job_id, owner, others, write)?;
        Ok(canonical.to_string_lossy().into_owned())
    }

    /// A file the task writes: under a root, its directory created if need be; if it exists, it
    /// carries this job's mark.
    pub fn output_file(&self, location: &str, job_id: &str) -> Result<String, TaskError> {
        // (the one output file, export_geoparquet's, is written locally and renamed into place)
        if location.starts_with("s3://") {
            return Err(TaskError::permanent(
                "bad_params",
                format!("{location}: this output is a local file (write it under a root, then copy it to S3)"),
            ));
        }
        let path = self.output_path(location)?;
        let parent = path.parent().ok_or_else(|| forbidden(format!("{location} names no file")))?;
        std::fs::create_dir_all(parent).map_err(|e| crate::io_error(location, &e))?;
        let parent = parent.canonicalize().map_err(|e| crate::io_error(location, &e))?;
        self.under_root(location, &parent)?;
        let file = parent.join(path.file_name().ok_or_else(|| forbidden(format!("{location} names no file")))?);
        match std::fs::symlink_metadata(&file) {
            Ok(meta) if meta.file_type().is_symlink() || !meta.is_file() => {
                return Err(forbidden(format!(
                    "{location} exists and is not a plain file: an output is never written through it"
                )))
            }
            Ok(_) if file_mark(&file).as_deref() != Some(job_id) => {
                return Err(forbidden(format!(
                    "{location} exists and was not written by this job: outputs never replace another's file"
                )))
            }
            _ => {}
        }
        Ok(file.to_string_lossy().into_owned())
    }

    /// A table: `name` (in the confined schema) or `schema.name` with that schema.
    pub fn table(&self, text: &str) -> Result<String, TaskError> {
        let table = crate::db::TableName::parse_in(text, &self.schema)?;
        if table.schema != self.schema {
            return Err(forbidden(format!(
                "table {text}: this worker writes and reads tables of schema {} only",
                self.schema
            )));
        }
        Ok(table.display())
    }

    /// An `s3://` location under an allowed bucket prefix, as it is (the handlers turn it into
    /// GDAL's `/vsis3/` path); `None` when the location is not an S3 one.
    fn s3(&self, location: &str) -> Result<Option<String>, TaskError> {
        if !location.starts_with("s3://") {
            return Ok(None);
        }
        let (bucket, key) =
            split_s3(location).ok_or_else(|| TaskError::permanent("bad_url", format!("{location}: no bucket")))?;
        clean_key(&key).map_err(|e| forbidden(format!("{location}: {e}")))?;
        let allowed = self.buckets.iter().any(|(name, prefix)| {
            *name == bucket && (prefix.is_empty() || key == *prefix || key.starts_with(&format!("{prefix}/")))
        });
        if !allowed {
            return Err(forbidden(format!(
                "{location} is outside the buckets this worker may use ({}): see stageflow worker --geo-bucket",
                if self.buckets.is_empty() {
                    "none configured".to_owned()
                } else {
                    self.buckets.iter().map(|(b, p)| format!("s3://{b}/{p}")).collect::<Vec<_>>().join(", ")
                }
            )));
        }
        Ok(Some(location.to_owned()))
    }

    /// A plain local path (absolute, or relative to the worker's directory), made absolute; GDAL's
    /// virtual file systems and driver prefixes are refused.
    fn plain_path(&self, location: &str) -> Result<PathBuf, TaskError> {
        if location.contains('\0') {
            return Err(TaskError::permanent("bad_params", "NUL in a path"));
        }
        if !location.starts_with('/') && location.contains("://") {
            return Err(TaskError::permanent(
                "bad_url",
                format!("{location}: only local paths and s3:// locations are supported"),
            ));
        }
        let gdal_special = location.starts_with("/vsi")
            || location.contains("://")
            || location.split('/').next().is_some_and(|first| first.contains(':'));
        if gdal_special {
            return Err(forbidden(format!(
                "{location}: only plain paths under the worker's roots and s3:// locations of its buckets are opened \
                 (no GDAL virtual file systems, driver prefixes or URLs)"
            )));
        }
        if self.roots.is_empty() {
            return Err(forbidden(format!(
                "{location}: this worker has no local roots, so it opens no local path (see stageflow worker --geo-root)"
            )));
        }
        let path = Path::new(location);
        Ok(if path.is_absolute() {
            path.to_owned()
        } else {
            std::env::current_dir().map_err(|e| crate::io_error(location, &e))?.join(path)
        })
    }

    /// An output path: plain, and where it does not exist yet its components are plain names
    /// (no `..`) below an existing ancestor under a root.
    fn output_path(&self, location: &str) -> Result<PathBuf, TaskError> {
        let path = self.plain_path(location)?;
        let mut existing = path.as_path();
        while !existing.exists() {
            existing = existing.parent().ok_or_else(|| forbidden(format!("{location}: no part of it exists")))?;
        }
        let canonical = existing.canonicalize().map_err(|e| crate::io_error(location, &e))?;
        self.under_root(location, &canonical)?;
        let rest = path.strip_prefix(existing).unwrap_or(Path::new(""));
        if rest.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(forbidden(format!("{location}: `..` and `.` are not followed in an output path")));
        }
        Ok(canonical.join(rest))
    }

    fn under_root(&self, location: &str, canonical: &Path) -> Result<(), TaskError> {
        if self.roots.iter().any(|root| canonical.starts_with(root)) {
            return Ok(());
        }
        Err(forbidden(format!(
            "{location} ({}) is outside the directories this worker may use ({}): see stageflow worker --geo-root",
            canonical.display(),
            if self.roots.is_empty() {
                "none configured".to_owned()
            } else {
                self.roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ")
            }
        )))
    }
}

/// The rule of an output directory, local or S3: marked as this job's, or else empty and then
/// marked (`write` leaves the mark and returns the owner read back), or refused.
fn claim_directory(
    location: &str,
    job_id: &str,
    owner: impl Fn() -> Result<Option<String>, TaskError>,
    others: impl FnOnce() -> Result<bool, TaskError>,
    write: impl FnOnce() -> Result<Option<String>, TaskError>,
) -> Result<(), TaskError> {
    let someone_else = |owner: String| {
        forbidden(format!(
            "{location} holds the output of job {owner}, not of this job: outputs never replace another job's"
        ))
    };
    match owner()? {
        Some(owner) if owner == job_id => Ok(()),
        Some(owner) => Err(someone_else(owner)),
        // (a task of the same job may have marked it and written since the mark was read)
        None if others()? => match owner()? {
            Some(owner) if owner == job_id => Ok(()),
            _ => Err(forbidden(format!(
                "{location} is not empty and was not written by this job: an output directory must be new, \
                 empty, or this job's own"
            ))),
        },
        None => match write()? {
            Some(owner) if owner == job_id => Ok(()),
            Some(owner) => Err(someone_else(owner)),
            None => Err(TaskError::retryable("io", format!("{location}: the mark written was not read back"))),
        },
    }
}

/// A number distinct per call in this process (for temporary names).
fn task_suffix() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// `s3://bucket/key` as (bucket, key).
fn split_s3(location: &str) -> Option<(String, String)> {
    let rest = location.strip_prefix("s3://")?;
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return None;
    }
    Some((bucket.to_owned(), key.to_owned()))
}

/// A key whose segments are names: no `.`, `..` or empty segment inside it.
fn clean_key(key: &str) -> Result<(), String> {
    let trimmed = key.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok(());
    }
    if trimmed.split('/').any(|segment| segment.is_empty() || segment == "." || segment == "..") {
        return Err("empty, `.` and `..` segments are not allowed in an S3 key".into());
    }
    Ok(())
}

/// The job id an output file carries in its extended attribute, if any.
pub fn file_mark(path: &Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let c_name = std::ffi::CString::new(FILE_MARK).ok()?;
    let mut buffer = [0u8; 128];
    // SAFETY: both strings are NUL-terminated and outlive the call; the buffer's length is passed.
    let n = unsafe { libc::getxattr(c_path.as_ptr(), c_name.as_ptr(), buffer.as_mut_ptr().cast(), buffer.len()) };
    if n <= 0 {
        return None;
    }
    String::from_utf8(buffer[..n as usize].to_vec()).ok()
}

/// Marks an output file as written by `job_id` (see [`FILE_MARK`]).
pub fn mark_file(path: &Path, job_id: &str) -> Result<(), TaskError> {
    use std::os::unix::ffi::OsStrExt;
    let context = path.to_string_lossy();
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| TaskError::permanent("bad_params", "NUL in a path"))?;
    let c_name = std::ffi::CString::new(FILE_MARK).map_err(|_| TaskError::permanent("bad_params", "NUL"))?;
    // SAFETY: both strings are NUL-terminated and outlive the call; the value's length is passed.
    let done = unsafe { libc::setxattr(c_path.as_ptr(), c_name.as_ptr(), job_id.as_ptr().cast(), job_id.len(), 0) };
    if done != 0 {
        return Err(crate::io_error(
            &format!("marking {context} as this job's output"),
            &std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Gives a finished output file (`tmp`, marked as this job's) its name: taken only if the name is
/// free at that instant (`RENAME_NOREPLACE`), or holds a plain file marked as this job's. A file
/// another job put there after the params were checked is not replaced.
pub fn place_output(tmp: &Path, output: &Path, job_id: &str) -> Result<(), TaskError> {
    use std::os::unix::ffi::OsStrExt;
    let context = || format!("renaming {} to {}", tmp.display(), output.display());
    let c_tmp = std::ffi::CString::new(tmp.as_os_str().as_bytes())
        .map_err(|_| TaskError::permanent("bad_params", "NUL in a path"))?;
    let c_output = std::ffi::CString::new(output.as_os_str().as_bytes())
        .map_err(|_| TaskError::permanent("bad_params", "NUL in a path"))?;
    // SAFETY: both strings are NUL-terminated and outlive the call; AT_FDCWD makes them plain paths.
    let renamed = unsafe {
        libc::renameat2(libc::AT_FDCWD, c_tmp.as_ptr(), libc::AT_FDCWD, c_output.as_ptr(), libc::RENAME_NOREPLACE)
    };
    if renamed == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    if error.kind() != std::io::ErrorKind::AlreadyExists {
        return Err(crate::io_error(&context(), &error));
    }
    match std::fs::symlink_metadata(output) {
        Ok(meta) if meta.is_file() && file_mark(output).as_deref() == Some(job_id) => {
            std::fs::rename(tmp, output).map_err(|e| crate::io_error(&context(), &e))
        }
        _ => Err(forbidden(format!(
            "{} was created by someone else while this task wrote: outputs never replace another's file",
            output.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("stageflow-confine-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn local_paths_stay_under_the_roots_whatever_links_say() {
        let base = dir("links");
        let root = base.join("root");
        std::fs::create_dir_all(root.join("in")).unwrap();
        std::fs::write(root.join("in/a.tif"), b"x").unwrap();
        std::fs::write(base.join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(base.join("secret"), root.join("in/escape")).unwrap();
        std::os::unix::fs::symlink(&base, root.join("up")).unwrap();
        let c = Confinement::new(std::slice::from_ref(&root), &[], "stageflow_geo", DEFAULT_MAX_PIXELS).unwrap();
        let root = root.canonicalize().unwrap();
        assert_eq!(c.read(root.join("in/a.tif").to_str().unwrap()).unwrap(), root.join("in/a.tif").to_str().unwrap());
        for outside in
            [root.join("in/escape"), root.join("up/secret"), root.join("in/../../secret"), base.join("secret")]
        {
            let error = c.read(outside.to_str().unwrap()).unwrap_err();
            assert_eq!(error.kind, "forbidden_path", "{}: {error:?}", outside.display());
        }
        // An output through a link out of the root, or climbing out, is refused too.
        for outside in [root.join("up/new/out.parquet"), root.join("in/new/../../../x.parquet")] {
            let error = c.output_file(outside.to_str().unwrap(), "job").unwrap_err();
            assert_eq!(error.kind, "forbidden_path", "{}: {error:?}", outside.display());
        }
        for special in ["/vsicurl/http://169.254.169.254/latest", "/vsistdin/", "GTIFF_RAW:/etc/passwd"] {
            assert_eq!(c.read(special).unwrap_err().kind, "forbidden_path", "{special}");
        }
        assert_eq!(c.read("http://169.254.169.254/y.tif").unwrap_err().kind, "bad_url");
        // Missing outside the roots is refused (not "not found": no probing); missing inside is not_found.
        assert_eq!(c.read(base.join("nothing/here").to_str().unwrap()).unwrap_err().kind, "forbidden_path");
        assert_eq!(c.read(root.join("nothing/here").to_str().unwrap()).unwrap_err().kind, "not_found");
        let none = Confinement::new(&[], &[], "stageflow_geo", DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!(none.read(root.join("in/a.tif").to_str().unwrap()).unwrap_err().kind, "forbidden_path");
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn outputs_never_replace_what_the_job_did_not_write() {
        let root = dir("outputs");
        let c = Confinement::new(std::slice::from_ref(&root), &[], "stageflow_geo", DEFAULT_MAX_PIXELS).unwrap();
        let root = root.canonicalize().unwrap();
        // A new directory is marked as the job's; the job may come back, another may not.
        let tiles = root.join("tiles");
        c.output_directory(tiles.to_str().unwrap(), "job-a").unwrap();
        c.output_directory(tiles.to_str().unwrap(), "job-a").unwrap();
        assert_eq!(c.output_directory(tiles.to_str().unwrap(), "job-b").unwrap_err().kind, "forbidden_path");
        // A directory with files the job did not write is refused.
        std::fs::create_dir_all(root.join("home")).unwrap();
        std::fs::write(root.join("home/notes"), b"x").unwrap();
        assert_eq!(
            c.output_directory(root.join("home").to_str().unwrap(), "job-a").unwrap_err().kind,
            "forbidden_path"
        );
        // A file: new is fine; existing and unmarked refused; marked by the job fine, by another refused.
        let file = root.join("out.parquet");
        assert_eq!(c.output_file(file.to_str().unwrap(), "job-a").unwrap(), file.to_str().unwrap());
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(c.output_file(file.to_str().unwrap(), "job-a").unwrap_err().kind, "forbidden_path");
        mark_file(&file, "job-a").unwrap();
        c.output_file(file.to_str().unwrap(), "job-a").unwrap();
        assert_eq!(c.output_file(file.to_str().unwrap(), "job-b").unwrap_err().kind, "forbidden_path");
        // The finished file takes a free name or the job's own file, not one put there since.
        let (tmp, placed) = (root.join("out.tmp"), root.join("placed.parquet"));
        let finished = |job: &str| {
            std::fs::write(&tmp, job).unwrap();
            mark_file(&tmp, job).unwrap();
        };
        finished("job-a");
        place_output(&tmp, &placed, "job-a").unwrap();
        finished("job-a");
        place_output(&tmp, &placed, "job-a").unwrap();
        assert_eq!(std::fs::read_to_string(&placed).unwrap(), "job-a");
        finished("job-b");
        assert_eq!(place_output(&tmp, &placed, "job-b").unwrap_err().kind, "forbidden_path");
        std::fs::remove_file(&placed).unwrap();
        std::os::unix::fs::symlink(root.join("home/notes"), &placed).unwrap();
        finished("job-a");
        assert_eq!(place_output(&tmp, &placed, "job-a").unwrap_err().kind, "forbidden_path");
        assert_eq!(std::fs::read_to_string(root.join("home/notes")).unwrap(), "x");
        // A file over the byte budget is not read.
        let small = Confinement::new(std::slice::from_ref(&root), &[], "stageflow_geo", DEFAULT_MAX_PIXELS)
            .unwrap()
            .with_max_bytes(4);
        std::fs::write(root.join("big.bin"), b"12345").unwrap();
        std::fs::write(root.join("tiny.bin"), b"1234").unwrap();
        assert_eq!(small.read(root.join("big.bin").to_str().unwrap()).unwrap_err().kind, "over_budget");
        assert!(small.read(root.join("tiny.bin").to_str().unwrap()).is_ok());
        assert_eq!(small.within(root.to_str().unwrap(), "big.bin").unwrap_err().kind, "over_budget");
        // An output file is local: an s3:// one would have been written to a relative path.
        assert_eq!(c.output_file("s3://bucket/out.parquet", "job-a").unwrap_err().kind, "bad_params");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn s3_locations_and_tables_stay_where_they_are_allowed() {
        let c = Confinement::new(&[], &["s3://rasters/tiles".into(), "s3://survey".into()], "geo", DEFAULT_MAX_PIXELS)
            .unwrap();
        assert!(c.read("s3://rasters/tiles/a.tif").is_ok());
        assert!(c.read("s3://rasters/tiles").is_ok());
        assert!(c.read("s3://survey/any/thing").is_ok());
        for refused in
            ["s3://rasters/tilesets/a.tif", "s3://rasters/other", "s3://rasters/tiles/../x", "s3://elsewhere/a"]
        {
            assert_eq!(c.read(refused).unwrap_err().kind, "forbidden_path", "{refused}");
        }
        assert_eq!(c.table("nc").unwrap(), "geo.nc");
        assert_eq!(c.table("geo.nc").unwrap(), "geo.nc");
        assert_eq!(c.table("public.nc").unwrap_err().kind, "forbidden_path");
        assert_eq!(c.table("Robert'); DROP TABLE x;--").unwrap_err().kind, "bad_params");
    }
}
