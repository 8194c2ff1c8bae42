//! validate_stac through the engine on the test cluster: the STAC catalog that process_raster writes
//! for a real Landsat scene is valid; a copy broken in known ways reports each defect with its
//! document and JSON pointer.
//!
//! Offline: nothing on this machine can reach the internet, and the `jsonschema` crate is built
//! without its HTTP features, so every schema these validations use (STAC core, GeoJSON, PROJJSON,
//! projection and raster extensions) comes from the files shipped in `schemas/`; an extension that
//! is not shipped is reported, not fetched. That these jobs succeed is the proof.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

mod jobs;

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

fn read(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn write(path: &Path, value: &Value) {
    std::fs::write(path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The COGs and STAC collection of the Landsat scene in 9 tiles, written by process_raster through
/// the engine, with a root Catalog above the collection.
fn landsat_catalog(url: &str, client: &mut postgres::Client) -> PathBuf {
    let scene = "/var/tmp/stageflow-geodata/stars/usr/lib/R/site-library/stars/tif/L7_ETMs.tif";
    assert!(Path::new(scene).exists(), "{scene} is missing: scripts/setup.sh fetches it");
    let output = std::env::temp_dir().join(format!("stageflow-geo-validate-stac-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&output);
    let (_, status, _) = jobs::run_job(
        url,
        client,
        "process_raster",
        json!({"source": scene, "tile_size": 128, "output": output.to_str().unwrap()}),
        2,
    );
    assert_eq!(status["status"], json!("completed"), "{status}");
    write(
        &output.join("catalog.json"),
        &json!({
            "type": "Catalog", "stac_version": "1.0.0", "id": "landsat", "description": "The Landsat 7 scene of r-cran-stars",
            "links": [{"rel": "root", "href": "./catalog.json"}, {"rel": "self", "href": "./catalog.json"},
                      {"rel": "child", "href": "./collection.json", "type": "application/json"},
                      {"rel": "license", "href": "https://example.com/not-followed.json"}],
        }),
    );
    output
}

fn has_error(errors: &[Value], document: &str, pointer: &str, needle: &str) -> bool {
    errors.iter().any(|e| {
        e["document"] == json!(document)
            && e["pointer"] == json!(pointer)
            && e["message"].as_str().unwrap().contains(needle)
    })
}

#[test]
fn a_valid_catalog_and_a_broken_copy() {
    let (url, mut client) = jobs::geo_database("geo_validate_stac");
    let output = landsat_catalog(&url, &mut client);

    let (job_id, status, elapsed) = jobs::run_job(
        &url,
        &mut client,
        "validate_stac",
        json!({"path": output.join("catalog.json").to_str().unwrap()}),
        2,
    );
    eprintln!("validate_stac of 11 documents: {elapsed:.2?}");
    assert_eq!(status["status"], json!("completed"), "{status}");
    let report = &jobs::result_of(&mut client, &status);
    // The root catalog, the collection and 9 items; the license link is not followed.
    assert_eq!(report["documents"], json!(11), "{report}");
    assert_eq!(report["valid"], json!(11), "{report}");
    assert_eq!(report["error_count"], json!(0), "{report}");
    assert_eq!(status["stages"][1]["task_count"], json!(11));
    // Each item was checked against the core item schema and both extensions.
    let item_task: Value = client
        .query_one(
            "SELECT result FROM stageflow.tasks WHERE job_id = $1 AND stage = 2 AND task_key = 'items:tile_x1_y2.json'",
            &[&job_id],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        item_task["schemas"],
        json!([
            stageflow_geo::validate_stac::ITEM,
            stageflow_geo::validate_stac::EXTENSIONS[0],
            stageflow_geo::validate_stac::EXTENSIONS[1]
        ]),
        "{item_task}"
    );

    // A broken copy.
    let broken = output.with_file_name(format!("{}-broken", output.file_name().unwrap().to_str().unwrap()));
    let _ = std::fs::remove_dir_all(&broken);
    copy_dir(&output, &broken);
    let items = broken.join("items");
    let mut no_geometry = read(&items.join("tile_x0_y0.json"));
    no_geometry.as_object_mut().unwrap().remove("geometry");
    write(&items.join("tile_x0_y0.json"), &no_geometry);
    let mut bad_epsg = read(&items.join("tile_x1_y0.json"));
    bad_epsg["properties"]["proj:epsg"] = json!("EPSG:31985");
    write(&items.join("tile_x1_y0.json"), &bad_epsg);
    let mut unknown_extension = read(&items.join("tile_x2_y0.json"));
    unknown_extension["stac_extensions"]
        .as_array_mut()
        .unwrap()
        .push(json!("https://stac-extensions.github.io/eo/v1.1.0/schema.json"));
    write(&items.join("tile_x2_y0.json"), &unknown_extension);
    std::fs::write(items.join("tile_x0_y1.json"), "{\"type\": \"Feature\", truncated").unwrap();
    let mut collection = read(&broken.join("collection.json"));
    collection["extent"]["spatial"]["bbox"] = json!([[-34.9, -8.1, -34.8]]);
    collection["links"].as_array_mut().unwrap().push(json!({"rel": "item", "href": "./items/missing.json"}));
    write(&broken.join("collection.json"), &collection);

    let (_, status, _) = jobs::run_job(
        &url,
        &mut client,
        "validate_stac",
        json!({"path": broken.join("catalog.json").to_str().unwrap()}),
        2,
    );
    assert_eq!(status["status"], json!("completed"), "a broken catalog is a report, not a failed job: {status}");
    let report = &jobs::result_of(&mut client, &status);
    let errors = report["errors"].as_array().unwrap();
    assert_eq!(report["documents"], json!(12), "the missing item is checked too: {report}");
    assert_eq!(report["valid"], json!(6), "{report}");
    assert_eq!(report["error_count"], json!(errors.len()));
    let mut invalid: Vec<&str> = report["invalid"].as_array().unwrap().iter().map(|d| d.as_str().unwrap()).collect();
    invalid.sort();
    assert_eq!(
        invalid,
        [
            "collection.json",
            "items/missing.json",
            "items/tile_x0_y0.json",
            "items/tile_x0_y1.json",
            "items/tile_x1_y0.json",
            "items/tile_x2_y0.json"
        ]
    );
    let pretty = serde_json::to_string_pretty(errors).unwrap();
    assert!(has_error(errors, "items/tile_x0_y0.json", "", "\"geometry\" is a required property"), "{pretty}");
    assert!(has_error(errors, "items/tile_x1_y0.json", "/properties/proj:epsg", "is not of types"), "{pretty}");
    assert!(has_error(errors, "collection.json", "/extent/spatial/bbox/0", "has less than 4 items"), "{pretty}");
    assert!(
        has_error(errors, "items/tile_x2_y0.json", "/stac_extensions/2", "eo/v1.1.0/schema.json is not shipped"),
        "{pretty}"
    );
    assert!(has_error(errors, "items/tile_x0_y1.json", "", "not JSON"), "{pretty}");
    assert!(has_error(errors, "items/missing.json", "", "cannot read"), "{pretty}");
    // Nothing else is wrong: every error is in one of the broken documents, and the projection
    // and raster fields of the item with the unknown extension are still valid.
    assert!(errors.iter().all(|e| invalid.contains(&e["document"].as_str().unwrap())), "{pretty}");
    assert_eq!(errors.iter().filter(|e| e["document"] == json!("items/tile_x2_y0.json")).count(), 1, "{pretty}");

    std::fs::remove_dir_all(&output).unwrap();
    std::fs::remove_dir_all(&broken).unwrap();
}

#[test]
fn roots_that_are_missing_or_not_stac() {
    let (url, mut client) = jobs::geo_database("geo_validate_stac_roots");
    let (job_id, status, _) = jobs::run_job(
        &url,
        &mut client,
        "validate_stac",
        json!({"path": std::env::temp_dir().join("stageflow-nonexistent/catalog.json")}),
        2,
    );
    assert_eq!(status["status"], json!("failed"), "{status}");
    let errors = jobs::task_errors(&mut client, &job_id);
    assert_eq!(
        (errors[0].0.as_str(), errors[0].1["type"].clone(), errors[0].1["category"].clone()),
        ("discover", json!("not_found"), json!("permanent"))
    );

    // JSON of no STAC type: one document, one error, in the report.
    let dir = std::env::temp_dir().join(format!("stageflow-geo-validate-root-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write(&dir.join("thing.json"), &json!({"hello": "world"}));
    let (_, status, _) =
        jobs::run_job(&url, &mut client, "validate_stac", json!({"path": dir.join("thing.json").to_str().unwrap()}), 2);
    assert_eq!(status["status"], json!("completed"), "{status}");
    let report = jobs::result_of(&mut client, &status);
    assert_eq!((report["documents"].clone(), report["valid"].clone()), (json!(1), json!(0)));
    let errors = report["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1);
    assert!(has_error(errors, "thing.json", "", "no recognisable STAC type"), "{errors:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
