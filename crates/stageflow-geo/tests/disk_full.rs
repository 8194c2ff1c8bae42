//! A full disk is a categorised, retryable error (`disk_full`), never a panic or a vague failure:
//! the outputs go to a real 64 KiB tmpfs mounted for the test (root, or sudo without a password,
//! as scripts/setup.sh also needs), which a COG tile of the Landsat scene and the North Carolina
//! GeoParquet file do not fit in.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

mod jobs;

use std::path::{Path, PathBuf};
use std::process::Command;

use jobs::*;
use serde_json::json;

/// A tmpfs of `kib` KiB mounted at a fresh directory, unmounted when dropped.
struct TinyDisk {
    dir: PathBuf,
}

fn as_root(args: &[&str]) -> std::process::Output {
    let root = Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
    let mut command = if root { Command::new(args[0]) } else { Command::new("sudo") };
    if !root {
        command.arg("-n").arg(args[0]);
    }
    command.args(&args[1..]).output().unwrap_or_else(|e| panic!("{}: {e}", args[0]))
}

impl TinyDisk {
    fn mount(name: &str, kib: u32) -> TinyDisk {
        let dir = std::env::temp_dir().join(format!("stageflow-tiny-{name}"));
        let _ = as_root(&["umount", "-l", dir.to_str().unwrap()]);
        std::fs::create_dir_all(&dir).unwrap();
        let out =
            as_root(&["mount", "-t", "tmpfs", "-o", &format!("size={kib}k,mode=1777"), "tmpfs", dir.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "mounting a tmpfs (needs root or sudo -n): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TinyDisk { dir }
    }

    fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = as_root(&["umount", "-l", self.dir.to_str().unwrap()]);
    }
}

#[test]
fn a_cog_tile_on_a_full_disk_is_a_retryable_disk_full_error() {
    let disk = TinyDisk::mount("cog", 64);
    let source = geodata("stars/usr/lib/R/site-library/stars/tif/L7_ETMs.tif");
    let output = disk.path().join("tiles");
    let params = json!({"source": source, "output": output.to_str().unwrap(),
                        "col": 0, "row": 0, "xoff": 0, "yoff": 0, "xsize": 349, "ysize": 352});
    let error = stageflow_geo::raster::cog(&task("geo.raster_cog", params)).unwrap_err();
    assert_eq!((error.kind.as_str(), error.category.as_str()), ("disk_full", "transient"), "{error}");
    assert!(error.message.contains("No space left"), "{error}");
}

#[test]
fn a_geoparquet_export_on_a_full_disk_is_a_retryable_disk_full_error() {
    let disk = TinyDisk::mount("parquet", 8);
    let (url, mut client) = geo_database("geo_disk_full");
    let (_, loaded, _) = run_job(&url, &mut client, "stage_vector", stage_params(&geodata(NC), "nc"), 2);
    assert_eq!(loaded["status"], json!("completed"), "{loaded}");
    let output = disk.path().join("nc.parquet");
    let error = stageflow_geo::geoparquet_export::write(
        &task("geo.geoparquet_write", json!({"table": "nc", "output": output.to_str().unwrap()})),
        &url,
    )
    .unwrap_err();
    assert_eq!((error.kind.as_str(), error.category.as_str()), ("disk_full", "transient"), "{error}");
    assert!(!output.exists(), "no half-written output");
    let left: Vec<_> = std::fs::read_dir(disk.path()).unwrap().collect();
    assert!(left.is_empty(), "the temporary file is removed: {left:?}");
}
