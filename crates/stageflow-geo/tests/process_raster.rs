//! The geospatial job types on real data (a Landsat 7 scene shipped by Debian's r-cran-stars,
//! fetched by scripts/setup.sh), through the engine on a real cluster; the COGs are checked by
//! GDAL's own validator (osgeo_utils' validate_cloud_optimized_geotiff.py) and by rio-cogeo, not by
//! us.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

mod jobs;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stageflow_tests::{connect, fresh_database, job_status, submit};
use stageflow_worker::{builtin_handlers, Task, Worker, WorkerConfig};

fn data(name: &str) -> String {
    let dir = std::env::var("STAGEFLOW_GEODATA")
        .unwrap_or_else(|_| "/var/tmp/stageflow-geodata/stars/usr/lib/R/site-library/stars/tif".into());
    let path = PathBuf::from(dir).join(name);
    assert!(path.exists(), "{} is missing: scripts/setup.sh fetches it", path.display());
    path.to_string_lossy().into_owned()
}

fn task(handler: &str, params: Value) -> Task {
    Task::standalone(handler, params)
}

#[test]
fn metadata_of_a_landsat_scene() {
    let info = stageflow_geo::raster::metadata(&data("L7_ETMs.tif")).unwrap();
    assert_eq!(info["crs"]["epsg"], json!(31985), "SIRGAS 2000 / UTM zone 25S");
    assert_eq!((info["width"].clone(), info["height"].clone()), (json!(349), json!(352)));
    assert_eq!(info["bands"].as_array().unwrap().len(), 6);
    assert_eq!(info["bands"][0]["data_type"], json!("Byte"));
    assert_eq!(info["is_cog"], json!(false));
    let b = info["bounds_wgs84"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect::<Vec<_>>();
    // Olinda / Recife, Brazil.
    assert!(b[0] > -35.0 && b[2] < -34.7 && b[1] > -8.1 && b[3] < -7.9, "{b:?}");
}

#[test]
fn bad_inputs_are_categorised_errors_not_panics() {
    let missing = stageflow_geo::raster::metadata("/nonexistent/x.tif").unwrap_err();
    assert_eq!((missing.kind.as_str(), missing.category.as_str()), ("not_found", "permanent"));
    let not_raster =
        stageflow_geo::raster::metadata(&format!("{}/Cargo.toml", env!("CARGO_MANIFEST_DIR"))).unwrap_err();
    assert_eq!(not_raster.kind, "unreadable");
    // A raster without a CRS, written with GDAL.
    let bare = std::env::temp_dir().join("stageflow-geo-no-crs.tif");
    let driver = gdal::DriverManager::get_driver_by_name("GTiff").unwrap();
    drop(driver.create_with_band_type::<u8, _>(&bare, 4, 4, 1).unwrap());
    let no_crs = stageflow_geo::raster::metadata(bare.to_str().unwrap()).unwrap_err();
    assert_eq!(no_crs.kind, "missing_crs", "{no_crs}");
    let small =
        stageflow_geo::raster::plan(&task("geo.raster_plan", json!({"source": "/nonexistent.tif", "tile_size": 64})))
            .unwrap_err();
    assert_eq!(small.kind, "not_found");
}

#[test]
fn process_raster_tiles_a_scene_into_valid_cogs_and_a_stac_catalog() {
    let url = fresh_database("geo_process_raster");
    let mut client = connect(&url);
    for (name, definition) in stageflow_geo::job_types() {
        client.execute("SELECT stageflow.register_job_type($1, $2)", &[&name, &definition]).unwrap();
    }
    let output = std::env::temp_dir().join("stageflow-geo-out");
    let _ = std::fs::remove_dir_all(&output);
    let source = data("L7_ETMs.tif");
    let job_id = submit(
        &mut client,
        "process_raster",
        json!({"source": source, "tile_size": 128, "output": output.to_str().unwrap()}),
    );

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut config = WorkerConfig::new(url.clone());
    config.queues = vec!["geo".into()];
    config.concurrency = 2;
    config.poll_interval = Duration::from_millis(100);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = runtime.spawn(
        Worker::new(config, stageflow_geo::handlers(builtin_handlers(), &url, jobs::test_confinement())).run(async {
            let _ = stopped.await;
        }),
    );
    let start = Instant::now();
    let status = loop {
        let status = job_status(&mut client, &job_id);
        if status["status"] != json!("processing") && status["status"] != json!("queued") {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "process_raster did not finish: {status}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = stop.send(());
    runtime.block_on(worker).unwrap();
    assert_eq!(status["status"], json!("completed"), "{status}");

    // 349 x 352 pixels in tiles of 128: 3 columns, 3 rows.
    let cog_stage = &status["stages"][2];
    assert_eq!(cog_stage["task_count"], json!(9), "{cog_stage}");
    // Lineage: the cog task of tile_x1_y2 got its plan entry.
    let row = client
        .query_one(
            "SELECT params FROM stageflow.tasks WHERE job_id = $1 AND stage = 3 AND task_key = 'tile_x1_y2'",
            &[&job_id],
        )
        .unwrap();
    let params: Value = row.get(0);
    assert_eq!(
        (params["col"].clone(), params["row"].clone(), params["xoff"].clone(), params["yoff"].clone()),
        (json!(1), json!(2), json!(128), json!(256))
    );
    assert_eq!(
        (params["xsize"].clone(), params["ysize"].clone()),
        (json!(128), json!(96)),
        "the last row is 352 - 256 = 96 high"
    );

    // Every tile is a valid COG by GDAL's own validator and by rio-cogeo (PyPI, in the venv
    // scripts/setup.sh makes), neither of them ours.
    let validator = "/usr/lib/python3/dist-packages/osgeo_utils/samples/validate_cloud_optimized_geotiff.py";
    let rio = "/var/tmp/stageflow-pytools/bin/rio";
    for col in 0..3 {
        for row in 0..3 {
            let tif = output.join(format!("tile_x{col}_y{row}.tif"));
            let check = Command::new("/usr/bin/python3").arg(validator).arg(&tif).output().unwrap();
            assert!(
                check.status.success(),
                "{}: {}{}",
                tif.display(),
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
            let check = Command::new(rio)
                .args(["cogeo", "validate", "--strict"])
                .arg(&tif)
                .output()
                .unwrap_or_else(|e| panic!("{rio}: {e} (scripts/setup.sh installs it)"));
            let said = String::from_utf8_lossy(&check.stdout);
            assert!(
                check.status.success() && said.contains("is a valid cloud optimized GeoTIFF"),
                "rio cogeo validate {}: {said}{}",
                tif.display(),
                String::from_utf8_lossy(&check.stderr)
            );
            let info = stageflow_geo::raster::metadata(tif.to_str().unwrap()).unwrap();
            assert_eq!(info["is_cog"], json!(true));
            assert_eq!(info["compression"], json!("DEFLATE"));
            assert_eq!(info["bands"].as_array().unwrap().len(), 6);
        }
    }

    // The STAC catalog: a collection linking 9 items whose bboxes lie in its extent.
    let collection: Value = serde_json::from_slice(&std::fs::read(output.join("collection.json")).unwrap()).unwrap();
    assert_eq!(collection["type"], json!("Collection"));
    let extent = collection["extent"]["spatial"]["bbox"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect::<Vec<_>>();
    let items: Vec<&Value> =
        collection["links"].as_array().unwrap().iter().filter(|l| l["rel"] == json!("item")).collect();
    assert_eq!(items.len(), 9);
    for link in items {
        let item: Value =
            serde_json::from_slice(&std::fs::read(output.join(link["href"].as_str().unwrap())).unwrap()).unwrap();
        let b = item["bbox"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect::<Vec<_>>();
        assert!(
            b[0] >= extent[0] - 1e-9
                && b[1] >= extent[1] - 1e-9
                && b[2] <= extent[2] + 1e-9
                && b[3] <= extent[3] + 1e-9,
            "{b:?} in {extent:?}"
        );
        assert_eq!(item["properties"]["proj:epsg"], json!(31985));
        assert_eq!(item["assets"]["data"]["raster:bands"].as_array().unwrap().len(), 6);
        assert_eq!(
            item["assets"]["data"]["raster:bands"][0]["data_type"],
            json!("uint8"),
            "the raster extension's name"
        );
        assert_eq!(item["geometry"]["coordinates"][0].as_array().unwrap().len(), 5);
    }
    let result = stageflow_tests::job_result(&mut client, &job_id);
    assert_eq!(result["items"], json!(9), "the job's result is the fan-in's");
}
