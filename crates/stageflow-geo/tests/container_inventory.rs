//! container_inventory through the engine on the test cluster, on real geodata (a Landsat GeoTIFF,
//! a GeoPackage, a GeoJSON file, a Natural Earth shapefile in its five parts, fetched by
//! scripts/setup.sh) in a local directory and on an S3 prefix of a local moto server. Checksums are
//! checked against the `sha256sum` command, not against our own code.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

mod jobs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use jobs::PYTOOLS;
use serde_json::{json, Value};
use stageflow_worker::Task;

/// The files of the test container: (relative path, original file), and the media type expected.
fn fixture() -> Vec<(String, PathBuf, &'static str)> {
    let shapes = "geopandas/usr/lib/python3/dist-packages/geopandas/datasets/naturalearth_lowres";
    let mut files = vec![
        (
            "L7_ETMs.tif".to_owned(),
            jobs::geodata("stars/usr/lib/R/site-library/stars/tif/L7_ETMs.tif").into(),
            "image/tiff; application=geotiff",
        ),
        ("vector/nc.gpkg".to_owned(), jobs::geodata(jobs::NC).into(), "application/geopackage+sqlite3"),
        ("vector/cycle_hire.geojson".to_owned(), jobs::geodata(jobs::CYCLE_HIRE).into(), "application/geo+json"),
    ];
    for (extension, media) in [
        ("shp", "application/vnd.shp"),
        ("shx", "application/vnd.shx"),
        ("dbf", "application/vnd.dbf"),
        ("prj", "text/plain"),
        ("cpg", "text/plain"),
    ] {
        let name = format!("naturalearth_lowres.{extension}");
        files.push((format!("vector/countries/{name}"), jobs::geodata(&format!("{shapes}/{name}")).into(), media));
    }
    files
}

/// Copies the fixture into a new directory and adds files of our own: JSON that is not GeoJSON,
/// a name with a space (its task key is sanitised and hashed), an empty file.
fn make_container(name: &str) -> (PathBuf, BTreeMap<String, &'static str>) {
    let dir = std::env::temp_dir().join(format!("stageflow-geo-inventory-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut expected = BTreeMap::new();
    for (relative, original, media) in fixture() {
        let target = dir.join(&relative);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(&original, &target).unwrap();
        expected.insert(relative, media);
    }
    std::fs::create_dir_all(dir.join("notes")).unwrap();
    std::fs::write(dir.join("notes/params.json"), br#"{"type": "survey", "bands": [1, 2, 3]}"#).unwrap();
    expected.insert("notes/params.json".into(), "application/json");
    std::fs::write(dir.join("notes/read me.txt"), "Landsat 7 scene and vectors of North Carolina.\n").unwrap();
    expected.insert("notes/read me.txt".into(), "text/plain");
    std::fs::write(dir.join("notes/empty"), b"").unwrap();
    expected.insert("notes/empty".into(), "application/x-empty");
    // A GeoTIFF whose directory (with the GeoTIFF tags) comes after its pixels, beyond the bytes
    // inspect keeps, so that it is read with ranged requests (GDAL writes the directory first, so
    // this one is written by hand and then checked by GDAL); and a TIFF without georeferencing.
    std::fs::create_dir_all(dir.join("generated")).unwrap();
    let late = dir.join("generated/late_directory.tif");
    std::fs::write(&late, tiff_with_directory_last(300, 300)).unwrap();
    let info = stageflow_geo::raster::metadata(late.to_str().unwrap()).unwrap();
    assert_eq!(
        (info["crs"]["epsg"].clone(), info["width"].clone()),
        (json!(32633), json!(300)),
        "GDAL reads it: {info}"
    );
    expected.insert("generated/late_directory.tif".into(), "image/tiff; application=geotiff");
    let driver = gdal::DriverManager::get_driver_by_name("GTiff").unwrap();
    drop(driver.create_with_band_type::<u8, _>(dir.join("generated/plain.tif"), 4, 4, 1).unwrap());
    expected.insert("generated/plain.tif".into(), "image/tiff");
    (dir, expected)
}

/// A little-endian GeoTIFF of `width` x `height` bytes in UTM zone 33N: header, pixels, the tag
/// values that do not fit in an entry, then the directory.
fn tiff_with_directory_last(width: u32, height: u32) -> Vec<u8> {
    let pixels = width * height;
    let mut out = b"II*\0".to_vec();
    out.extend_from_slice(&[0; 4]); // the directory's offset, set below
    out.extend((0..pixels).map(|i| (i % 251) as u8));
    let scale_at = out.len() as u32;
    for v in [10.0f64, 10.0, 0.0] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let tiepoint_at = out.len() as u32;
    for v in [0.0f64, 0.0, 0.0, 500_000.0, 5_000_000.0, 0.0] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let keys_at = out.len() as u32;
    // GeoKeyDirectory: version 1.1.0, 3 keys: projected model, pixel is area, EPSG:32633.
    let keys: [u16; 16] = [1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633];
    for k in keys {
        out.extend_from_slice(&k.to_le_bytes());
    }
    let directory = out.len() as u32;
    out[4..8].copy_from_slice(&directory.to_le_bytes());
    // (tag, type: 3 SHORT, 4 LONG, 12 DOUBLE, count, value or offset)
    let entries: [(u16, u16, u32, u32); 12] = [
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (273, 4, 1, 8),
        (277, 3, 1, 1),
        (278, 4, 1, height),
        (279, 4, 1, pixels),
        (33550, 12, 3, scale_at),
        (33922, 12, 6, tiepoint_at),
        (34735, 3, keys.len() as u32, keys_at),
    ];
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    for (tag, kind, count, value) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&value.to_le_bytes());
    }
    out.extend_from_slice(&0u32.to_le_bytes());
    out
}

/// `sha256sum FILE`'s digest.
fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_owned()
}

/// What a completed inventory must say about the files in `originals` (relative path -> the local
/// file with the same content): each listed once, right size, checksum and media type, and the
/// table's rows equal to the result.
fn check_inventory(
    client: &mut postgres::Client,
    job_id: &str,
    status: &Value,
    originals: &BTreeMap<String, PathBuf>,
    expected: &BTreeMap<String, &'static str>,
) {
    assert_eq!(status["status"], json!("completed"), "{status}");
    let result = &jobs::result_of(client, status);
    let files = result["files"].as_array().unwrap();
    assert_eq!(result["count"], json!(expected.len()), "{result}");
    assert_eq!(files.len(), expected.len());
    assert_eq!(status["stages"][1]["task_count"], json!(expected.len()), "one inspect task per file");
    let listed: Vec<&str> = files.iter().map(|f| f["path"].as_str().unwrap()).collect();
    let wanted: Vec<&str> = expected.keys().map(String::as_str).collect();
    assert_eq!(listed, wanted, "every file once, in path order");
    let mut total = 0;
    let mut by_type: BTreeMap<String, u64> = BTreeMap::new();
    for file in files {
        let path = file["path"].as_str().unwrap();
        let original = &originals[path];
        let size = std::fs::metadata(original).unwrap().len();
        total += size;
        *by_type.entry(expected[path].to_owned()).or_default() += 1;
        assert_eq!(file["size"], json!(size), "{path}");
        assert_eq!(file["sha256"], json!(sha256sum(original)), "{path}");
        assert_eq!(file["media_type"], json!(expected[path]), "{path}: {file}");
        assert!(file["modified"].as_str().unwrap().starts_with("20"), "{path}: {file}");
    }
    assert_eq!(result["total_bytes"], json!(total));
    assert_eq!(result["media_types"], json!(by_type));
    let geojson = files.iter().find(|f| f["path"] == json!("vector/cycle_hire.geojson")).unwrap();
    assert_eq!(geojson["metadata"]["features"], json!(742), "cycle_hire has 742 docking stations");

    // The table holds the same rows as the result (in byte order, as the result lists them: the
    // database's own collation may sort paths otherwise).
    let rows = client
        .query("SELECT path, size, sha256, media_type, modified::text FROM stageflow_geo.inventory WHERE job_id = $1 ORDER BY path COLLATE \"C\"", &[&job_id])
        .unwrap();
    assert_eq!(rows.len() as u64, result["count"].as_u64().unwrap(), "one row per file");
    for (row, file) in rows.iter().zip(files) {
        assert_eq!(row.get::<_, String>(0), file["path"].as_str().unwrap());
        assert_eq!(row.get::<_, i64>(1) as u64, file["size"].as_u64().unwrap());
        assert_eq!(row.get::<_, String>(2), file["sha256"].as_str().unwrap());
        assert_eq!(row.get::<_, String>(3), file["media_type"].as_str().unwrap());
        assert!(row.get::<_, Option<String>>(4).is_some());
    }
}

/// A catalog task run again with the same inputs (a retry) leaves the same rows.
fn rerun_catalog(url: &str, client: &mut postgres::Client, job_id: &str, source: &str) {
    let inputs: Value = client
        .query_one(
            "SELECT jsonb_agg(result ORDER BY task_key) FROM stageflow.job_tasks($1) WHERE stage = 2",
            &[&job_id],
        )
        .unwrap()
        .get(0);
    let rows = |client: &mut postgres::Client| -> (i64, String) {
        let row = client
            .query_one(
                "SELECT count(*), md5(string_agg(i::text, '|' ORDER BY path)) FROM stageflow_geo.inventory AS i WHERE job_id = $1",
                &[&job_id],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    let before = rows(client);
    let task = Task {
        task_id: "retry".into(),
        job_id: job_id.into(),
        job_type: "container_inventory".into(),
        stage: 3,
        stage_name: "catalog".into(),
        handler: "geo.inventory_catalog".into(),
        task_key: "0".into(),
        params: json!({"source": source}),
        predecessor: None,
        inputs: Some(inputs),
        attempt: 2,
        timeout_seconds: None,
        lease_token: 0,
        lease_seconds: 0,
    };
    let again = stageflow_geo::inventory::catalog(&task, url).unwrap();
    assert_eq!(again["count"].as_i64().unwrap(), before.0);
    assert_eq!(rows(client), before, "a retried catalog task leaves the same rows");
}

/// The tests of this binary run one at a time: the S3 test sets AWS_* variables for the worker it
/// runs in this process, and setting the environment while another thread (GDAL) reads it is not
/// safe.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[test]
fn inventory_of_a_local_directory() {
    let _serial = one_at_a_time();
    let (dir, expected) = make_container("local");
    let (url, mut client) = jobs::geo_database("geo_inventory_local");
    let source = dir.to_str().unwrap().to_owned();
    let (job_id, status, elapsed) =
        jobs::run_job(&url, &mut client, "container_inventory", json!({"source": source}), 2);
    eprintln!("container_inventory of {} local files: {elapsed:.2?}", expected.len());
    let originals: BTreeMap<String, PathBuf> = expected.keys().map(|p| (p.clone(), dir.join(p))).collect();
    check_inventory(&mut client, &job_id, &status, &originals, &expected);

    // Keys: from the path, `/` as `:`; the name with a space is sanitised and hashed.
    let keys: Vec<String> = client
        .query("SELECT task_key FROM stageflow.tasks WHERE job_id = $1 AND stage = 2 ORDER BY task_key", &[&job_id])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(keys.contains(&"vector:countries:naturalearth_lowres.shp".to_owned()), "{keys:?}");
    assert!(keys.iter().any(|k| k.starts_with("notes:read_me.txt-")), "{keys:?}");

    // A local raster carries its GDAL metadata.
    let inventory = jobs::result_of(&mut client, &status);
    let tif = inventory["files"].as_array().unwrap().iter().find(|f| f["path"] == json!("L7_ETMs.tif")).unwrap();
    assert_eq!(tif["metadata"]["raster"]["crs"]["epsg"], json!(31985), "{tif}");
    assert_eq!(tif["metadata"]["raster"]["bands"].as_array().unwrap().len(), 6);

    rerun_catalog(&url, &mut client, &job_id, &source);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A directory that does not exist, under the workers' roots (the temporary directory).
fn missing_survey() -> String {
    std::env::temp_dir().join("stageflow-nonexistent/survey").to_string_lossy().into_owned()
}

#[test]
fn a_missing_source_fails_the_job_with_a_categorised_error() {
    let _serial = one_at_a_time();
    let (url, mut client) = jobs::geo_database("geo_inventory_missing");
    let (job_id, status, _) =
        jobs::run_job(&url, &mut client, "container_inventory", json!({"source": missing_survey()}), 2);
    assert_eq!(status["status"], json!("failed"), "{status}");
    let errors = jobs::task_errors(&mut client, &job_id);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, "list");
    assert_eq!(
        (errors[0].1["type"].clone(), errors[0].1["category"].clone()),
        (json!("not_found"), json!("permanent")),
        "{errors:?}"
    );
    let attempts: i32 = client.query_one("SELECT attempt FROM stageflow.job_tasks($1)", &[&job_id]).unwrap().get(0);
    assert_eq!(attempts, 1, "a permanent error is not retried");

    // A file is not a directory, and an unsupported URL is a bad URL: both permanent.
    let file = std::env::temp_dir().join(format!("stageflow-inventory-a-file-{}", std::process::id()));
    std::fs::write(&file, "not a directory").unwrap();
    let file = file.to_string_lossy().into_owned();
    let (job_id, status, _) = jobs::run_job(&url, &mut client, "container_inventory", json!({"source": file}), 2);
    assert_eq!(status["status"], json!("failed"));
    assert_eq!(jobs::task_errors(&mut client, &job_id)[0].1["type"], json!("not_a_directory"));
    let (job_id, status, _) =
        jobs::run_job(&url, &mut client, "container_inventory", json!({"source": "ftp://example/x"}), 2);
    assert_eq!(status["status"], json!("failed"));
    assert_eq!(jobs::task_errors(&mut client, &job_id)[0].1["type"], json!("bad_url"));
}

#[test]
fn inventory_of_an_s3_prefix() {
    let _serial = one_at_a_time();
    let moto = jobs::Moto::start();
    // The worker runs in this process: it reads the AWS_* variables set here (the other tests of
    // this binary wait for this one: see ONE_AT_A_TIME).
    for (name, value) in [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("AWS_ENDPOINT", moto.endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
    ] {
        std::env::set_var(name, value);
    }
    std::env::remove_var("AWS_SESSION_TOKEN");

    // A bucket with the fixture under survey/2024/ and one object outside the prefix.
    let (dir, expected) = make_container("s3");
    let upload = r#"
import os, sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
s3.create_bucket(Bucket="geo-survey")
root = sys.argv[2]
for base, _, names in os.walk(root):
    for name in names:
        path = os.path.join(base, name)
        s3.upload_file(path, "geo-survey", "survey/2024/" + os.path.relpath(path, root))
s3.put_object(Bucket="geo-survey", Key="survey/2023/old.txt", Body=b"outside the prefix")
"#;
    let out = Command::new(format!("{PYTOOLS}/python"))
        .args(["-c", upload, &moto.endpoint, dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "upload: {}", String::from_utf8_lossy(&out.stderr));

    let (url, mut client) = jobs::geo_database("geo_inventory_s3");
    let source = "s3://geo-survey/survey/2024";
    let (job_id, status, elapsed) =
        jobs::run_job(&url, &mut client, "container_inventory", json!({"source": source}), 2);
    eprintln!("container_inventory of {} S3 objects: {elapsed:.2?}", expected.len());
    let originals: BTreeMap<String, PathBuf> = expected.keys().map(|p| (p.clone(), dir.join(p))).collect();
    check_inventory(&mut client, &job_id, &status, &originals, &expected);
    let inventory = jobs::result_of(&mut client, &status);
    let tif = inventory["files"].as_array().unwrap().iter().find(|f| f["path"] == json!("L7_ETMs.tif")).unwrap();
    assert_eq!(tif["location"], json!("s3://geo-survey/survey/2024/L7_ETMs.tif"));
    rerun_catalog(&url, &mut client, &job_id, source);

    // An empty prefix and a missing bucket: permanent not_found.
    for missing in ["s3://geo-survey/survey/1999", "s3://no-such-bucket/x"] {
        let (job_id, status, _) =
            jobs::run_job(&url, &mut client, "container_inventory", json!({"source": missing}), 2);
        assert_eq!(status["status"], json!("failed"), "{missing}: {status}");
        let errors = jobs::task_errors(&mut client, &job_id);
        assert_eq!(
            (errors[0].1["type"].clone(), errors[0].1["category"].clone()),
            (json!("not_found"), json!("permanent")),
            "{missing}: {errors:?}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
    drop(moto);
}
