//! What a geospatial job's params can reach, tried as a team sharing one worker would: each job
//! runs through the engine on a worker confined to a root directory (and the schema
//! stageflow_geo), and names a path, an object or a table outside what it may use. Each is
//! refused with a permanent `forbidden_path` error naming the rule, and nothing outside is
//! touched. (Before the worker was confined, each of these wrote, read or emptied what it named.)

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

mod jobs;

use std::path::{Path, PathBuf};

use jobs::*;
use serde_json::{json, Value};
use stageflow_geo::Confinement;

const LANDSAT: &str = "stars/usr/lib/R/site-library/stars/tif/L7_ETMs.tif";

/// A fresh directory `<tmp>/stageflow-confine-<name>-<pid>` with `root` and `outside` in it.
fn dirs(name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let base = std::env::temp_dir().join(format!("stageflow-confine-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(base.join("root")).unwrap();
    std::fs::create_dir_all(base.join("outside")).unwrap();
    (base.clone(), base.join("root"), base.join("outside"))
}

/// A worker that may use `root` (and the geodata, read only in practice) and stageflow_geo.
fn confined_to(root: &Path) -> Confinement {
    let geodata = std::env::var("STAGEFLOW_GEODATA_ROOT").unwrap_or_else(|_| "/var/tmp/stageflow-geodata".into());
    Confinement::new(
        &[root.to_owned(), PathBuf::from(geodata)],
        &["s3://rasters/allowed".into()],
        "stageflow_geo",
        1 << 32,
    )
    .unwrap()
}

/// The job failed and the first failed task's error is `kind`, its message naming `mentions`.
fn refused(client: &mut postgres::Client, job_id: &str, status: &Value, kind: &str, mentions: &str) {
    assert_eq!(status["status"], json!("failed"), "{status}");
    let errors = task_errors(client, job_id);
    let (_, error) = errors.first().unwrap_or_else(|| panic!("no task error: {status}"));
    assert_eq!((error["type"].as_str(), error["category"].as_str()), (Some(kind), Some("permanent")), "{error}");
    assert!(error["message"].as_str().unwrap().contains(mentions), "{error}");
}

#[test]
fn an_export_never_writes_outside_the_roots_nor_over_a_file_it_did_not_write() {
    let (url, mut client) = geo_database("geo_confine_export");
    let (base, root, outside) = dirs("export");
    let nc = geodata(NC);
    let (_, loaded, _) = run_job(&url, &mut client, "stage_vector", json!({"source": nc, "table": "nc"}), 2);
    assert_eq!(loaded["status"], json!("completed"), "{loaded}");

    // A file someone else keeps outside the root (think ~/.ssh/authorized_keys).
    let keys = outside.join("authorized_keys");
    std::fs::write(&keys, "ssh-ed25519 AAAA the owner's key\n").unwrap();
    let (job_id, status, _) = run_job_confined(
        &url,
        &mut client,
        "export_geoparquet",
        json!({"table": "nc", "output": keys.to_str().unwrap()}),
        1,
        confined_to(&root),
    );
    refused(&mut client, &job_id, &status, "forbidden_path", "outside the directories this worker may use");
    assert_eq!(std::fs::read_to_string(&keys).unwrap(), "ssh-ed25519 AAAA the owner's key\n");
    // The same through a symbolic link inside the root, and by climbing out of it.
    std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
    for sneaky in [root.join("link/authorized_keys"), root.join("../outside/authorized_keys")] {
        let (job_id, status, _) = run_job_confined(
            &url,
            &mut client,
            "export_geoparquet",
            json!({"table": "nc", "output": sneaky.to_str().unwrap()}),
            1,
            confined_to(&root),
        );
        refused(&mut client, &job_id, &status, "forbidden_path", "outside the directories");
    }
    assert_eq!(std::fs::read_to_string(&keys).unwrap(), "ssh-ed25519 AAAA the owner's key\n");

    // Inside the root, a file the job did not write is not replaced; a new one is written and
    // marked, and the same job may write it again.
    let theirs = root.join("theirs.parquet");
    std::fs::write(&theirs, "someone's data").unwrap();
    let (job_id, status, _) = run_job_confined(
        &url,
        &mut client,
        "export_geoparquet",
        json!({"table": "nc", "output": theirs.to_str().unwrap()}),
        1,
        confined_to(&root),
    );
    refused(&mut client, &job_id, &status, "forbidden_path", "was not written by this job");
    assert_eq!(std::fs::read_to_string(&theirs).unwrap(), "someone's data");
    // A link planted where the export writes its temporary file is not followed.
    let planted = root.join("planted.parquet");
    let tmp = format!("{}.0000000000000000-s1-0-1.tmp", planted.display());
    std::os::unix::fs::symlink(&keys, &tmp).unwrap();
    let error = stageflow_geo::geoparquet_export::write(
        &task("geo.geoparquet_write", json!({"table": "nc", "output": planted.to_str().unwrap()})),
        &url,
    )
    .unwrap_err();
    assert_eq!(error.kind, "io", "{error:?}");
    assert_eq!(std::fs::read_to_string(&keys).unwrap(), "ssh-ed25519 AAAA the owner's key\n");
    assert!(!planted.exists());
    let mine = root.join("out/nc.parquet");
    let params = json!({"table": "nc", "output": mine.to_str().unwrap()});
    let (job_id, status, _) =
        run_job_confined(&url, &mut client, "export_geoparquet", params.clone(), 1, confined_to(&root));
    assert_eq!(status["status"], json!("completed"), "{status}");
    assert_eq!(stageflow_geo::confine::file_mark(&mine).as_deref(), Some(job_id.as_str()));
    // (a second submission of the same work is the same job: its file is its own)
    let again = stageflow_geo::Confinement::output_file(&confined_to(&root), mine.to_str().unwrap(), &job_id);
    assert!(again.is_ok(), "{again:?}");
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn a_raster_job_opens_no_url_no_virtual_file_no_vrt_and_nothing_over_its_budget() {
    let (url, mut client) = geo_database("geo_confine_raster");
    let (base, root, outside) = dirs("raster");
    let landsat = geodata(LANDSAT);
    let output = root.join("tiles");
    let run = |client: &mut postgres::Client, source: &str, output: &Path, confinement: Confinement| {
        run_job_confined(
            &url,
            client,
            "process_raster",
            json!({"source": source, "tile_size": 256, "output": output.to_str().unwrap()}),
            1,
            confinement,
        )
    };
    // (each run writes to an output of its own: the same params would be the same job, resumed)
    let elsewhere = |n: u32| root.join(format!("refused-{n}"));
    for (n, source) in ["/vsicurl/http://169.254.169.254/latest/meta-data/iam", "/vsistdin/", "GTIFF_RAW:/etc/passwd"]
        .into_iter()
        .enumerate()
    {
        let (job_id, status, _) = run(&mut client, source, &elsewhere(n as u32), confined_to(&root));
        refused(&mut client, &job_id, &status, "forbidden_path", "no GDAL virtual file systems");
    }
    // A VRT under the root whose raw band reads a file the worker can read.
    let secret = outside.join("secret.bin");
    std::fs::write(&secret, vec![7u8; 4096]).unwrap();
    let vrt = root.join("scene.tif");
    std::fs::write(
        &vrt,
        format!(
            r#"<VRTDataset rasterXSize="64" rasterYSize="64"><VRTRasterBand dataType="Byte" band="1" subClass="VRTRawRasterBand">
<SourceFilename relativetoVRT="0">{}</SourceFilename><ImageOffset>0</ImageOffset><PixelOffset>1</PixelOffset><LineOffset>64</LineOffset>
</VRTRasterBand></VRTDataset>"#,
            secret.display()
        ),
    )
    .unwrap();
    let (job_id, status, _) = run(&mut client, vrt.to_str().unwrap(), &elsewhere(10), confined_to(&root));
    refused(&mut client, &job_id, &status, "unreadable", "is not a GeoTIFF");
    // Over the pixel budget (the scene is 349 x 352 x 6 = 737,088 pixels).
    let small = Confinement::new(
        &[root.clone(), PathBuf::from(&landsat).parent().unwrap().to_owned()],
        &[],
        "stageflow_geo",
        100_000,
    )
    .unwrap();
    let (job_id, status, _) = run(&mut client, &landsat, &elsewhere(11), small);
    refused(&mut client, &job_id, &status, "over_budget", "over this worker's budget");
    // Outputs: outside the root; into a directory with someone else's files.
    let (job_id, status, _) = run(&mut client, &landsat, &outside.join("tiles"), confined_to(&root));
    refused(&mut client, &job_id, &status, "forbidden_path", "outside the directories");
    assert!(!outside.join("tiles").exists());
    std::fs::create_dir_all(root.join("home")).unwrap();
    std::fs::write(root.join("home/notes.txt"), "mine").unwrap();
    let (job_id, status, _) = run(&mut client, &landsat, &root.join("home"), confined_to(&root));
    refused(&mut client, &job_id, &status, "forbidden_path", "not empty and was not written by this job");
    assert_eq!(std::fs::read_dir(root.join("home")).unwrap().count(), 1);
    // S3 outside the allowed prefix is refused before any request.
    let (job_id, status, _) = run(&mut client, "s3://rasters/elsewhere/scene.tif", &elsewhere(12), confined_to(&root));
    refused(&mut client, &job_id, &status, "forbidden_path", "outside the buckets");
    // A worker with no root opens no local path.
    let none = Confinement::new(&[], &[], "stageflow_geo", 1 << 32).unwrap();
    let (job_id, status, _) = run(&mut client, &landsat, &elsewhere(13), none);
    refused(&mut client, &job_id, &status, "forbidden_path", "no local roots");
    // Inside its roots the job runs, and its directory carries its mark.
    let (job_id, status, _) = run(&mut client, &landsat, &output, confined_to(&root));
    assert_eq!(status["status"], json!("completed"), "{status}");
    assert_eq!(std::fs::read_to_string(output.join(".stageflow-job")).unwrap(), job_id);
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn a_vector_job_touches_only_tables_of_its_schema() {
    let (url, mut client) = geo_database("geo_confine_tables");
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS payroll;
             CREATE TABLE payroll.salaries (fid bigint, geom geometry);
             INSERT INTO payroll.salaries VALUES (1, NULL), (2, NULL);",
        )
        .unwrap();
    let nc = geodata(NC);
    let (job_id, status, _) =
        run_job(&url, &mut client, "stage_vector", json!({"source": nc, "table": "payroll.salaries"}), 1);
    refused(&mut client, &job_id, &status, "forbidden_path", "tables of schema stageflow_geo only");
    let rows: i64 = client.query_one("SELECT count(*) FROM payroll.salaries", &[]).unwrap().get(0);
    assert_eq!(rows, 2, "the other schema's table is untouched");
    let out = std::env::temp_dir().join(format!("stageflow-confine-payroll-{}.parquet", std::process::id()));
    let (job_id, status, _) = run_job(
        &url,
        &mut client,
        "export_geoparquet",
        json!({"table": "payroll.salaries", "output": out.to_str().unwrap()}),
        1,
    );
    refused(&mut client, &job_id, &status, "forbidden_path", "tables of schema stageflow_geo only");
    assert!(!out.exists());

    // Inside the schema, a job writes only into a table it created: another job's table of the
    // same definition (the same source, loaded in other chunks) is not emptied and reloaded, nor
    // one that no job marked.
    let (_, status, _) = run_job(&url, &mut client, "stage_vector", json!({"source": nc, "table": "shared"}), 1);
    assert_eq!(status["status"], json!("completed"), "{status}");
    client.batch_execute("UPDATE stageflow_geo.shared SET name = 'theirs' WHERE fid = 1").unwrap();
    let digest = |client: &mut postgres::Client| -> String {
        client
            .query_one("SELECT md5(string_agg(t::text, '|' ORDER BY fid)) FROM stageflow_geo.shared t", &[])
            .unwrap()
            .get(0)
    };
    let before = digest(&mut client);
    let (job_id, status, _) =
        run_job(&url, &mut client, "stage_vector", json!({"source": nc, "table": "shared", "chunk_size": 17}), 1);
    refused(&mut client, &job_id, &status, "forbidden_path", "was not created by this job (job ");
    assert_eq!(digest(&mut client), before, "another job's table is untouched");
    client.batch_execute("COMMENT ON TABLE stageflow_geo.shared IS NULL").unwrap();
    let (job_id, status, _) =
        run_job(&url, &mut client, "stage_vector", json!({"source": nc, "table": "shared", "chunk_size": 19}), 1);
    refused(&mut client, &job_id, &status, "forbidden_path", "it is no job's");
    assert_eq!(digest(&mut client), before, "an unmarked table is untouched");
}

#[test]
fn an_inventory_and_a_stac_validation_read_nothing_outside_their_source() {
    let (url, mut client) = geo_database("geo_confine_reads");
    let (base, root, outside) = dirs("reads");
    std::fs::write(outside.join("private.key"), "-----BEGIN PRIVATE KEY-----").unwrap();
    // Listing a directory outside the roots.
    let (job_id, status, _) = run_job_confined(
        &url,
        &mut client,
        "container_inventory",
        json!({"source": outside.to_str().unwrap()}),
        1,
        confined_to(&root),
    );
    refused(&mut client, &job_id, &status, "forbidden_path", "outside the directories");
    // A survey inside the root with a link out of it: the linked file is not read or hashed.
    let survey = root.join("survey");
    std::fs::create_dir_all(&survey).unwrap();
    std::fs::write(survey.join("a.txt"), "a").unwrap();
    std::os::unix::fs::symlink(outside.join("private.key"), survey.join("b.key")).unwrap();
    let (job_id, status, _) = run_job_confined(
        &url,
        &mut client,
        "container_inventory",
        json!({"source": survey.to_str().unwrap()}),
        1,
        confined_to(&root),
    );
    // The link is listed (object_store follows it) and its inspect task refused before reading.
    refused(&mut client, &job_id, &status, "forbidden_path", "leads out of");
    let hashed: Vec<String> = client
        .query("SELECT result::text FROM stageflow.job_tasks($1) WHERE result IS NOT NULL", &[&job_id])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(hashed.iter().any(|r| r.contains("a.txt")), "the survey's own file was inspected: {hashed:?}");
    assert!(
        !hashed.iter().any(|r| r.contains("BEGIN PRIVATE KEY") || (r.contains("b.key") && r.contains("sha256"))),
        "{hashed:?}"
    );
    // A file over the worker's byte budget is not read (its inspect task refuses it).
    let budget = root.join("budget");
    std::fs::create_dir_all(&budget).unwrap();
    std::fs::write(budget.join("small.txt"), "a").unwrap();
    std::fs::write(budget.join("large.txt"), "0123456789").unwrap();
    let (job_id, status, _) = run_job_confined(
        &url,
        &mut client,
        "container_inventory",
        json!({"source": budget.to_str().unwrap()}),
        1,
        confined_to(&root).with_max_bytes(4),
    );
    refused(&mut client, &job_id, &status, "over_budget", "over this worker's budget of 4 bytes");
    // A STAC catalog whose child link climbs out of its directory: not followed.
    let catalog_dir = root.join("catalog");
    std::fs::create_dir_all(&catalog_dir).unwrap();
    std::fs::write(
        outside.join("collection.json"),
        r#"{"type": "Collection", "stac_version": "1.0.0", "id": "private", "description": "not to be read", "links": []}"#,
    )
    .unwrap();
    std::fs::write(
        catalog_dir.join("catalog.json"),
        r#"{"type": "Catalog", "stac_version": "1.0.0", "id": "c", "description": "d",
            "links": [{"rel": "child", "href": "../../outside/collection.json"}]}"#,
    )
    .unwrap();
    let (job_id, status, _) = run_job_confined(
        &url,
        &mut client,
        "validate_stac",
        json!({"path": catalog_dir.join("catalog.json").to_str().unwrap()}),
        1,
        confined_to(&root),
    );
    assert_eq!(status["status"], json!("completed"), "{status}");
    let discovered: Value = client
        .query_one("SELECT result FROM stageflow.job_tasks($1) WHERE stage_name = 'discover'", &[&job_id])
        .unwrap()
        .get(0);
    assert_eq!(discovered["documents"], json!(1), "{discovered}");
    assert_eq!(discovered["skipped_links"][0]["reason"], json!("outside the catalog's directory"), "{discovered}");
    let _ = std::fs::remove_dir_all(&base);
    let _ = job_id;
}
