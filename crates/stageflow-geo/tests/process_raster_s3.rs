//! process_raster and extract_metadata on S3 paths, against a local S3 server (moto, from PyPI):
//! the Landsat scene is uploaded to a bucket, tiled from `s3://` into COGs and a STAC catalog under
//! an `s3://` prefix, then downloaded with boto3 and checked by rio-cogeo and our offline STAC
//! validator. This binary holds this one test: it sets the AWS_* variables its in-process worker
//! (GDAL) reads, which must not happen while other threads run.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

mod jobs;

use std::path::PathBuf;
use std::process::Command;

use jobs::PYTOOLS;
use serde_json::{json, Value};

const LANDSAT: &str = "/var/tmp/stageflow-geodata/stars/usr/lib/R/site-library/stars/tif/L7_ETMs.tif";

fn python(script: &str, args: &[&str]) -> String {
    let out = Command::new(format!("{PYTOOLS}/python")).arg("-c").arg(script).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const S3: &str = r#"
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id="testing", aws_secret_access_key="testing")
"#;

#[test]
fn process_raster_reads_and_writes_s3() {
    assert!(PathBuf::from(LANDSAT).exists(), "{LANDSAT} is missing: scripts/setup.sh fetches it");
    let moto = jobs::Moto::start();
    for (name, value) in [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT", moto.endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
    ] {
        std::env::set_var(name, value);
    }
    std::env::remove_var("AWS_SESSION_TOKEN");
    python(
        &format!(
            "{S3}s3.create_bucket(Bucket='rasters')\ns3.upload_file(sys.argv[2], 'rasters', 'scenes/L7_ETMs.tif')"
        ),
        &[&moto.endpoint, LANDSAT],
    );

    let (url, mut client) = jobs::geo_database("geo_raster_s3");

    // extract_metadata straight from S3.
    let (_, status, _) =
        jobs::run_job(&url, &mut client, "extract_metadata", json!({"path": "s3://rasters/scenes/L7_ETMs.tif"}), 2);
    assert_eq!(status["status"], json!("completed"), "{status}");
    let metadata = jobs::result_of(&mut client, &status);
    assert_eq!(metadata["crs"]["epsg"], json!(31985));
    assert_eq!((metadata["width"].clone(), metadata["height"].clone()), (json!(349), json!(352)));

    // A missing object is a permanent not_found, as a missing local file is.
    let (job_id, status, _) =
        jobs::run_job(&url, &mut client, "extract_metadata", json!({"path": "s3://rasters/scenes/nothing.tif"}), 2);
    assert_eq!(status["status"], json!("failed"), "{status}");
    assert_eq!(jobs::task_errors(&mut client, &job_id)[0].1["type"], json!("not_found"));

    // process_raster from S3 to S3: 9 tiles of 128, the catalog beside them.
    let (_, status, elapsed) = jobs::run_job(
        &url,
        &mut client,
        "process_raster",
        json!({"source": "s3://rasters/scenes/L7_ETMs.tif", "tile_size": 128, "output": "s3://rasters/tiles/l7"}),
        2,
    );
    assert_eq!(status["status"], json!("completed"), "{status}");
    eprintln!("process_raster S3 -> S3, 9 tiles: {:.2} s", elapsed.as_secs_f64());
    let catalog = jobs::result_of(&mut client, &status);
    assert_eq!(catalog["items"], json!(9));
    assert_eq!(catalog["collection"], json!("s3://rasters/tiles/l7/collection.json"));

    // What is in the bucket, listed and downloaded with boto3 (not through our code).
    let listing = python(&format!("{S3}print('\\n'.join(sorted(o['Key'] for o in s3.list_objects_v2(Bucket='rasters', Prefix='tiles/l7/')['Contents'])))"),
                         &[&moto.endpoint]);
    let keys: Vec<&str> = listing.lines().collect();
    let tifs = keys.iter().filter(|k| k.ends_with(".tif")).count();
    let items = keys.iter().filter(|k| k.starts_with("tiles/l7/items/") && k.ends_with(".json")).count();
    assert_eq!((tifs, items), (9, 9), "{keys:?}");
    assert!(keys.contains(&"tiles/l7/collection.json"), "{keys:?}");

    // The prefix carries the writing job's mark; another job's output onto it is refused and
    // writes nothing, as is one onto a prefix holding someone else's object.
    let first = python(
        &format!("{S3}print(s3.get_object(Bucket='rasters', Key='tiles/l7/.stageflow-job')['Body'].read().decode())"),
        &[&moto.endpoint],
    );
    let writer: String = client
        .query_one("SELECT job_id FROM stageflow.jobs WHERE job_type = 'process_raster' AND params->>'output' = 's3://rasters/tiles/l7'", &[])
        .unwrap()
        .get(0);
    assert_eq!(first.trim(), writer);
    let etags = || {
        python(&format!("{S3}print('\\n'.join(sorted(o['Key'] + ' ' + o['ETag'] for o in s3.list_objects_v2(Bucket='rasters', Prefix='tiles/l7/')['Contents'])))"),
                             &[&moto.endpoint])
    };
    let before = etags();
    assert_eq!(before.lines().count(), keys.len(), "{before}");
    let (job_id, status, _) = jobs::run_job(
        &url,
        &mut client,
        "process_raster",
        json!({"source": "s3://rasters/scenes/L7_ETMs.tif", "tile_size": 256, "output": "s3://rasters/tiles/l7"}),
        2,
    );
    assert_eq!(status["status"], json!("failed"), "{status}");
    let error = &jobs::task_errors(&mut client, &job_id)[0].1;
    assert_eq!(error["type"], json!("forbidden_path"), "{error}");
    assert!(error["message"].as_str().unwrap().contains(&format!("holds the output of job {writer}")), "{error}");
    assert_eq!(etags(), before, "the first job's objects are untouched");
    assert_eq!(
        python(
            &format!(
                "{S3}print(s3.get_object(Bucket='rasters', Key='tiles/l7/.stageflow-job')['Body'].read().decode())"
            ),
            &[&moto.endpoint]
        )
        .trim(),
        writer
    );
    python(&format!("{S3}s3.put_object(Bucket='rasters', Key='theirs/notes.txt', Body=b'theirs')"), &[&moto.endpoint]);
    let (job_id, status, _) = jobs::run_job(
        &url,
        &mut client,
        "process_raster",
        json!({"source": "s3://rasters/scenes/L7_ETMs.tif", "tile_size": 128, "output": "s3://rasters/theirs"}),
        2,
    );
    assert_eq!(status["status"], json!("failed"), "{status}");
    let error = &jobs::task_errors(&mut client, &job_id)[0].1;
    assert_eq!(error["type"], json!("forbidden_path"), "{error}");
    assert!(error["message"].as_str().unwrap().contains("is not empty and was not written by this job"), "{error}");
    let theirs = python(
        &format!(
            "{S3}print(' '.join(o['Key'] for o in s3.list_objects_v2(Bucket='rasters', Prefix='theirs/')['Contents']))"
        ),
        &[&moto.endpoint],
    );
    assert_eq!(theirs.trim(), "theirs/notes.txt");

    // An object over the worker's byte budget is refused before GDAL reads it (a copy of the
    // scene: the same params would name the job that read it above).
    python(&format!("{S3}s3.copy_object(Bucket='rasters', Key='scenes/copy.tif', CopySource={{'Bucket': 'rasters', 'Key': 'scenes/L7_ETMs.tif'}})"),
           &[&moto.endpoint]);
    let (job_id, status, _) = jobs::run_job_confined(
        &url,
        &mut client,
        "extract_metadata",
        json!({"path": "s3://rasters/scenes/copy.tif"}),
        2,
        jobs::test_confinement().with_max_bytes(100_000),
    );
    assert_eq!(status["status"], json!("failed"), "{status}");
    let error = &jobs::task_errors(&mut client, &job_id)[0].1;
    assert_eq!(error["type"], json!("over_budget"), "{error}");
    let size = std::fs::metadata(LANDSAT).unwrap().len();
    assert!(error["message"].as_str().unwrap().contains(&format!("is {size} bytes")), "{error}");

    let local = std::env::temp_dir().join("stageflow-geo-s3-download");
    let _ = std::fs::remove_dir_all(&local);
    python(&format!("{S3}import os\nfor o in s3.list_objects_v2(Bucket='rasters', Prefix='tiles/l7/')['Contents']:\n    \
                     path = os.path.join(sys.argv[2], o['Key'][len('tiles/l7/'):])\n    \
                     os.makedirs(os.path.dirname(path), exist_ok=True)\n    s3.download_file('rasters', o['Key'], path)"),
           &[&moto.endpoint, local.to_str().unwrap()]);
    for key in keys.iter().filter(|k| k.ends_with(".tif")) {
        let tif = local.join(key.trim_start_matches("tiles/l7/"));
        let check =
            Command::new(format!("{PYTOOLS}/rio")).args(["cogeo", "validate", "--strict"]).arg(&tif).output().unwrap();
        let said = String::from_utf8_lossy(&check.stdout);
        assert!(
            check.status.success() && said.contains("is a valid cloud optimized GeoTIFF"),
            "{}: {said}",
            tif.display()
        );
    }

    // The downloaded catalog is valid STAC (offline schemas), its links resolving between files.
    let (_, report, _) = jobs::run_job(
        &url,
        &mut client,
        "validate_stac",
        json!({"path": local.join("collection.json").to_str().unwrap()}),
        2,
    );
    assert_eq!(report["status"], json!("completed"), "{report}");
    let result: &Value = &jobs::result_of(&mut client, &report);
    assert_eq!((result["documents"].clone(), result["error_count"].clone()), (json!(10), json!(0)), "{result}");
}
