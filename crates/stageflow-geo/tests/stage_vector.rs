//! stage_vector on real files (North Carolina counties as GeoPackage, London cycle-hire points as
//! GeoJSON, Natural Earth countries as Shapefile), through the engine with the worker runtime on a
//! real cluster with PostGIS. Counts are checked against GDAL's `ogrinfo`, validity against PostGIS.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

mod jobs;

use std::collections::HashMap;

use gdal::vector::LayerAccess;
use jobs::*;
use postgres::Client;
use serde_json::{json, Value};

fn rows(client: &mut Client, table: &str) -> i64 {
    client.query_one(&format!("SELECT count(*) FROM {table}"), &[]).unwrap().get(0)
}

fn invalid_in_postgis(client: &mut Client, table: &str) -> i64 {
    client.query_one(&format!("SELECT count(*) FROM {table} WHERE NOT ST_IsValid(geom)"), &[]).unwrap().get(0)
}

fn has_gist_index(client: &mut Client, table: &str) -> bool {
    let (schema, name) = table.split_once('.').unwrap();
    client
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_indexes WHERE schemaname = $1 AND tablename = $2 AND indexdef LIKE '%USING gist (geom)%')",
            &[&schema, &name],
        )
        .unwrap()
        .get(0)
}

fn srid_and_type(client: &mut Client, table: &str) -> (i32, String) {
    let (schema, name) = table.split_once('.').unwrap();
    let row = client
        .query_one(
            "SELECT srid, type FROM geometry_columns WHERE f_table_schema = $1 AND f_table_name = $2 AND f_geometry_column = 'geom'",
            &[&schema, &name],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

/// Loads one file, checks what every load must satisfy, and returns the job's result.
fn stage_and_check(url: &str, client: &mut Client, file: &str, table_param: &str, extra: Value) -> Value {
    let mut params = stage_params(file, table_param);
    let qualified =
        if table_param.contains('.') { table_param.to_owned() } else { format!("stageflow_geo.{table_param}") };
    let table = qualified.as_str();
    for (k, v) in extra.as_object().unwrap() {
        params[k] = v.clone();
    }
    let (_, status, elapsed) = run_job(url, client, "stage_vector", params, 2);
    assert_eq!(status["status"], json!("completed"), "{status}");
    let result = result_of(client, &status);
    eprintln!("stage_vector {file} -> {table}: {:.3} s, {} rows", elapsed.as_secs_f64(), result["rows"]);
    let expected = ogrinfo_feature_count(file);
    assert_eq!(result["rows"], json!(expected), "{result}");
    assert_eq!(rows(client, table), expected);
    let distinct: i64 = client.query_one(&format!("SELECT count(DISTINCT fid) FROM {table}"), &[]).unwrap().get(0);
    assert_eq!(distinct, expected);
    assert_eq!(result["invalid_geometries"]["count"], json!(invalid_in_postgis(client, table)), "{result}");
    assert!(has_gist_index(client, table), "no GiST index on {table}");
    let (srid, geometry_type) = srid_and_type(client, table);
    assert_eq!(result["srid"], json!(srid));
    assert_eq!(result["geometry_type"], json!(geometry_type));
    let bbox = result["bbox"].as_array().unwrap_or_else(|| panic!("no bbox: {result}"));
    assert_eq!(bbox.len(), 4);
    result
}

#[test]
fn stages_a_geopackage_with_its_types_and_crs() {
    let (url, mut client) = geo_database("geo_vector_nc");
    let file = geodata(NC);
    let result = stage_and_check(&url, &mut client, &file, "nc", json!({}));
    assert_eq!(result["table"], json!("stageflow_geo.nc"));
    assert_eq!(result["srid"], json!(4267), "NAD27");
    assert_eq!(result["geometry_type"], json!("MULTIPOLYGON"));
    assert_eq!(result["invalid_geometries"]["count"], json!(0));
    assert_eq!(result["null_geometries"], json!(0));
    let types: HashMap<String, String> = column_types(&mut client, "stageflow_geo.nc").into_iter().collect();
    assert_eq!(types["fid"], "bigint");
    assert_eq!(types["name"], "text");
    assert_eq!(types["area"], "double precision");
    assert_eq!(types["cress_id"], "integer");
    assert_eq!(types["geom"], "geometry(MultiPolygon,4267)");
    let primary_key: String = client
        .query_one(
            "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = 'stageflow_geo.nc'::regclass AND i.indisprimary",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(primary_key, "fid");

    // Attribute values and areas as GDAL reads them, feature by feature in reading order.
    let dataset = gdal::Dataset::open(&file).unwrap();
    let mut layer = dataset.layer(0).unwrap();
    let name_index = layer.defn().field_index("NAME").unwrap();
    let area_index = layer.defn().field_index("AREA").unwrap();
    let from_gdal: Vec<(String, f64, f64)> = layer
        .features()
        .map(|f| {
            (
                f.field_as_string(name_index).unwrap().unwrap(),
                f.field_as_double(area_index).unwrap().unwrap(),
                f.geometry().unwrap().area(),
            )
        })
        .collect();
    for fid in [1i64, 37, 100] {
        let row =
            client.query_one("SELECT name, area, ST_Area(geom) FROM stageflow_geo.nc WHERE fid = $1", &[&fid]).unwrap();
        let (name, area, geometry_area): (String, f64, f64) = (row.get(0), row.get(1), row.get(2));
        let expected = &from_gdal[fid as usize - 1];
        assert_eq!((name.as_str(), area), (expected.0.as_str(), expected.1), "fid {fid}");
        assert!((geometry_area - expected.2).abs() < 1e-12, "fid {fid}: {geometry_area} vs {}", expected.2);
    }

    // The table carries the mark of the job that created it, in its comment.
    let comment: String =
        client.query_one("SELECT obj_description('stageflow_geo.nc'::regclass, 'pg_class')", &[]).unwrap().get(0);
    let job_id = comment.strip_prefix("stageflow job ").unwrap_or_else(|| panic!("no job's mark: {comment:?}"));
    assert_eq!(job_id.len(), 64, "{comment}");
    // A retry of the job's own inspect task reuses its table: nothing is created, nothing duplicated.
    let mut retry = task("geo.vector_inspect", stage_params(&file, "nc"));
    retry.job_id = job_id.to_owned();
    let inspect = stageflow_geo::vector::inspect(&retry, &url).unwrap();
    assert_eq!(inspect["created"], json!(false), "{inspect}");
    assert_eq!(rows(&mut client, "stageflow_geo.nc"), 100);
    // The same task of another job (here: a standalone one) does not reuse it (confinement.rs
    // tries it through the engine).
    let other =
        stageflow_geo::vector::inspect(&task("geo.vector_inspect", stage_params(&file, "nc")), &url).unwrap_err();
    assert_eq!((other.kind.as_str(), other.category.as_str()), ("forbidden_path", "permanent"), "{other}");
    assert_eq!(rows(&mut client, "stageflow_geo.nc"), 100);
}

#[test]
fn stages_geojson_points_in_parallel_chunks_and_a_chunk_twice_leaves_no_duplicates() {
    let (url, mut client) = geo_database("geo_vector_cycle_hire");
    let file = geodata(CYCLE_HIRE);
    let (job_id, status, elapsed) = run_job(
        &url,
        &mut client,
        "stage_vector",
        json!({"source": file, "table": "stageflow_geo.cycle_hire", "chunk_size": 100}),
        3,
    );
    assert_eq!(status["status"], json!("completed"), "{status}");
    eprintln!("stage_vector cycle_hire in chunks of 100 with 3 slots: {:.3} s", elapsed.as_secs_f64());
    let result = &result_of(&mut client, &status);
    assert_eq!(result["rows"], json!(ogrinfo_feature_count(&file)));
    assert_eq!(result["rows"], json!(742));
    assert_eq!(result["srid"], json!(4326));
    assert_eq!(result["geometry_type"], json!("POINT"));
    assert_eq!(result["chunks"], json!(8), "742 features in chunks of 100");
    assert_eq!(status["stages"][1]["task_count"], json!(8), "{status}");
    assert!(has_gist_index(&mut client, "stageflow_geo.cycle_hire"));
    let types: HashMap<String, String> = column_types(&mut client, "stageflow_geo.cycle_hire").into_iter().collect();
    assert_eq!(
        (types["id"].as_str(), types["nbikes"].as_str(), types["name"].as_str()),
        ("integer", "integer", "text")
    );
    assert_eq!(types["geom"], "geometry(Point,4326)");

    // With 3 slots, load tasks ran at the same time: some two of them overlap in time.
    let spans: Vec<(f64, f64)> = client
        .query(
            "SELECT extract(epoch FROM started_at)::float8, extract(epoch FROM completed_at)::float8 \
             FROM stageflow.job_tasks($1) WHERE stage = 2",
            &[&job_id],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(spans.len(), 8);
    let overlapping = spans.iter().enumerate().any(|(i, a)| spans.iter().skip(i + 1).any(|b| a.0 < b.1 && b.0 < a.1));
    assert!(overlapping, "no two load tasks ran at once: {spans:?}");

    // A chunk run twice more, by hand, with the params the engine gave it.
    // The task's own params overlay the job's, as claim_tasks hands them to the worker.
    let own: Value = client
        .query_one(
            "SELECT params FROM stageflow.tasks WHERE job_id = $1 AND stage = 2 AND task_key = 'chunk_3'",
            &[&job_id],
        )
        .unwrap()
        .get(0);
    let mut params = status["params"].clone();
    for (k, v) in own.as_object().unwrap() {
        params[k] = v.clone();
    }
    assert_eq!((params["start"].clone(), params["count"].clone()), (json!(300), json!(100)));
    let digest = |client: &mut Client| -> String {
        client
            .query_one("SELECT md5(string_agg(t::text, '|' ORDER BY fid)) FROM stageflow_geo.cycle_hire t", &[])
            .unwrap()
            .get(0)
    };
    let before = digest(&mut client);
    let mut chunk = task("geo.vector_load", params.clone());
    chunk.job_id = job_id.clone();
    for _ in 0..2 {
        let again = stageflow_geo::vector::load(&chunk, &url).unwrap();
        assert_eq!((again["rows"].clone(), again["replaced"].clone()), (json!(100), json!(100)), "{again}");
    }
    assert_eq!(rows(&mut client, "stageflow_geo.cycle_hire"), 742);
    assert_eq!(digest(&mut client), before, "the chunk's rows are the same rows");
    let (first, last): (i64, i64) = {
        let r = client.query_one("SELECT min(fid), max(fid) FROM stageflow_geo.cycle_hire", &[]).unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((first, last), (1, 742));

    // A shorter source of the same shape, staged by another job into the same table, is refused
    // (a job writes only into a table it created) and changes nothing; with the table dropped,
    // it is created anew holding the 10 points and nothing of the 742 before (cut with GDAL's
    // ogr2ogr, not by us).
    let short = std::env::temp_dir().join("stageflow-cycle-hire-10.geojson");
    let _ = std::fs::remove_file(&short);
    let cut = std::process::Command::new("ogr2ogr")
        .args(["-f", "GeoJSON", "-limit", "10"])
        .arg(&short)
        .arg(&file)
        .output()
        .unwrap();
    assert!(cut.status.success(), "{}", String::from_utf8_lossy(&cut.stderr));
    let reload = |client: &mut Client, chunk_size: u64| {
        run_job(
            &url,
            client,
            "stage_vector",
            json!({"source": short.to_str().unwrap(), "table": "stageflow_geo.cycle_hire", "chunk_size": chunk_size}),
            2,
        )
    };
    let (other, refused, _) = reload(&mut client, 100);
    assert_eq!(refused["status"], json!("failed"), "{refused}");
    assert_eq!(task_errors(&mut client, &other)[0].1["type"], json!("forbidden_path"));
    assert_eq!(rows(&mut client, "stageflow_geo.cycle_hire"), 742);
    client.batch_execute("DROP TABLE stageflow_geo.cycle_hire").unwrap();
    let (_, reloaded, _) = reload(&mut client, 50);
    assert_eq!(reloaded["status"], json!("completed"), "{reloaded}");
    assert_eq!(result_of(&mut client, &reloaded)["rows"], json!(10));
    assert_eq!(rows(&mut client, "stageflow_geo.cycle_hire"), 10);
    let (first, last): (i64, i64) = {
        let r = client.query_one("SELECT min(fid), max(fid) FROM stageflow_geo.cycle_hire", &[]).unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((first, last), (1, 10));

    // The chunk size has a minimum, enforced by the job type's schema at submission.
    let refused = client
        .query_one(
            "SELECT stageflow.submit_job('stage_vector', $1)",
            &[&json!({"source": file, "table": "x", "chunk_size": 5})],
        )
        .unwrap_err();
    assert_eq!(refused.code().unwrap().code(), "22023", "{refused}");
}

#[test]
fn stages_a_shapefile_promoting_mixed_polygons_with_wide_numerics() {
    let (url, mut client) = geo_database("geo_vector_natural_earth");
    let file = geodata(NATURAL_EARTH);
    let result = stage_and_check(&url, &mut client, &file, "countries", json!({}));
    assert_eq!(result["srid"], json!(4326));
    // The layer says Polygon but holds both polygons and multipolygons: promoted to MultiPolygon.
    assert_eq!(result["geometry_type"], json!("MULTIPOLYGON"));
    let types: HashMap<String, String> = column_types(&mut client, "stageflow_geo.countries").into_iter().collect();
    assert_eq!(types["pop_est"], "numeric", "no narrow precision: pop_est is Real(24.15) in the .dbf");
    assert_eq!(types["gdp_md_est"], "bigint");
    assert_eq!(types["iso_a3"], "text");
    assert_eq!(types["geom"], "geometry(MultiPolygon,4326)");
    // Numerics and parts as GDAL reads them.
    let dataset = gdal::Dataset::open(&file).unwrap();
    let mut layer = dataset.layer(0).unwrap();
    let pop = layer.defn().field_index("pop_est").unwrap();
    let name = layer.defn().field_index("name").unwrap();
    let mut from_gdal = HashMap::new();
    for f in layer.features() {
        let geometry = f.geometry().unwrap();
        let parts = if geometry.geometry_name() == "MULTIPOLYGON" { geometry.geometry_count() } else { 1 };
        from_gdal.insert(
            f.field_as_string(name).unwrap().unwrap(),
            (f.field_as_double(pop).unwrap().unwrap(), parts as i32),
        );
    }
    for country in ["Canada", "Fiji", "Brazil", "Indonesia"] {
        let row = client
            .query_one(
                "SELECT pop_est::float8, ST_NumGeometries(geom) FROM stageflow_geo.countries WHERE name = $1",
                &[&country],
            )
            .unwrap();
        let (pop_est, parts): (f64, i32) = (row.get(0), row.get(1));
        assert_eq!((pop_est, parts), from_gdal[country], "{country}");
    }
    let singles: i64 = client
        .query_one("SELECT count(*) FROM stageflow_geo.countries WHERE ST_NumGeometries(geom) = 1", &[])
        .unwrap()
        .get(0);
    assert!(singles > 100, "most countries are one polygon, promoted to a one-part multipolygon: {singles}");
}

#[test]
fn reprojects_to_the_srid_asked_for() {
    let (url, mut client) = geo_database("geo_vector_reproject");
    let nc = geodata(NC);
    let cycle = geodata(CYCLE_HIRE);
    stage_and_check(&url, &mut client, &nc, "nc_4267", json!({}));
    let projected = stage_and_check(&url, &mut client, &nc, "nc_32119", json!({"srid": 32119}));
    assert_eq!(projected["srid"], json!(32119), "NAD83 / North Carolina, metres");
    stage_and_check(&url, &mut client, &cycle, "cycle_4326", json!({}));
    let mercator = stage_and_check(&url, &mut client, &cycle, "cycle_3857", json!({"srid": 3857}));
    assert_eq!(mercator["srid"], json!(3857));

    // GDAL's reprojection (traditional GIS axis order) against PostGIS's ST_Transform of the source.
    let worst = |client: &mut Client, a: &str, b: &str, srid: i32| -> f64 {
        client
            .query_one(
                &format!(
                    "SELECT max(ST_Distance(ST_Centroid(b.geom), ST_Centroid(ST_Transform(a.geom, {srid})))) \
                     FROM stageflow_geo.{a} a JOIN stageflow_geo.{b} b USING (fid)"
                ),
                &[],
            )
            .unwrap()
            .get(0)
    };
    let nc_error = worst(&mut client, "nc_4267", "nc_32119", 32119);
    let cycle_error = worst(&mut client, "cycle_4326", "cycle_3857", 3857);
    eprintln!("centroid differences, GDAL vs PostGIS: NC {nc_error:.6} m, cycle hire {cycle_error:.9} m");
    assert!(nc_error < 1.0, "NC centroids differ by up to {nc_error} m");
    assert!(cycle_error < 0.001, "cycle hire points differ by up to {cycle_error} m");
    // And really projected: Raleigh's county in metres, London in web mercator metres.
    let (x, y): (f64, f64) = {
        let r = client.query_one("SELECT ST_X(ST_Centroid(geom)), ST_Y(ST_Centroid(geom)) FROM stageflow_geo.nc_32119 WHERE name = 'Wake'", &[]).unwrap();
        (r.get(0), r.get(1))
    };
    assert!((600_000.0..700_000.0).contains(&x) && (200_000.0..260_000.0).contains(&y), "Wake county at {x}, {y}");
    let (x, y): (f64, f64) = {
        let r = client.query_one("SELECT avg(ST_X(geom)), avg(ST_Y(geom)) FROM stageflow_geo.cycle_3857", &[]).unwrap();
        (r.get(0), r.get(1))
    };
    assert!((-30_000.0..0.0).contains(&x) && (6_690_000.0..6_720_000.0).contains(&y), "London at {x}, {y}");
}

#[test]
fn an_invalid_geometry_is_loaded_and_reported_not_dropped() {
    let (url, mut client) = geo_database("geo_vector_invalid");
    let file = std::env::temp_dir().join("stageflow-geo-bowtie.geojson");
    std::fs::write(
        &file,
        json!({"type": "FeatureCollection", "features": [
            {"type": "Feature", "properties": {"label": "square"},
             "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]}},
            {"type": "Feature", "properties": {"label": "bowtie"},
             "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}},
            {"type": "Feature", "properties": {"label": "nothing"}, "geometry": null}
        ]})
        .to_string(),
    )
    .unwrap();
    let (_, status, _) = run_job(&url, &mut client, "stage_vector", stage_params(file.to_str().unwrap(), "bowtie"), 2);
    assert_eq!(status["status"], json!("completed"), "{status}");
    let result = &result_of(&mut client, &status);
    assert_eq!(result["rows"], json!(3), "{result}");
    assert_eq!(result["invalid_geometries"]["count"], json!(1), "{result}");
    let example = &result["invalid_geometries"]["examples"][0];
    assert_eq!(example["fid"], json!(2));
    assert!(example["reason"].as_str().unwrap().contains("Self-intersection"), "{example}");
    assert_eq!(result["null_geometries"], json!(1));
    assert_eq!(invalid_in_postgis(&mut client, "stageflow_geo.bowtie"), 1);
    let label: String =
        client.query_one("SELECT label FROM stageflow_geo.bowtie WHERE NOT ST_IsValid(geom)", &[]).unwrap().get(0);
    assert_eq!(label, "bowtie");
}

#[test]
fn bad_inputs_are_categorised_errors() {
    let (url, mut client) = geo_database("geo_vector_bad_inputs");
    let inspect =
        |params: Value| stageflow_geo::vector::inspect(&task("geo.vector_inspect", params), &url).unwrap_err();

    let missing = inspect(stage_params("/nonexistent/counties.gpkg", "x"));
    assert_eq!((missing.kind.as_str(), missing.category.as_str()), ("not_found", "permanent"), "{missing}");

    let text = std::env::temp_dir().join("stageflow-geo-notes.txt");
    std::fs::write(&text, "name,x,y\nnot,a,layer\n").unwrap();
    let unsupported = inspect(stage_params(text.to_str().unwrap(), "x"));
    assert_eq!(
        (unsupported.kind.as_str(), unsupported.category.as_str()),
        ("unsupported_format", "permanent"),
        "{unsupported}"
    );

    let nc = geodata(NC);
    for bad in ["Bad", "a;drop table x", "a.b.c", "1x", "x\"y"] {
        let error = inspect(stage_params(&nc, bad));
        assert_eq!(error.kind, "bad_params", "{bad}: {error}");
        let refused = client
            .query_one("SELECT stageflow.submit_job('stage_vector', $1)", &[&stage_params(&nc, bad)])
            .unwrap_err();
        assert_eq!(refused.code().unwrap().code(), "22023", "the schema's pattern refuses {bad:?}: {refused}");
    }

    // A shapefile without its .prj, with and without an srid.
    let dir = std::env::temp_dir().join("stageflow-geo-no-prj");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let shp = dir.join("nc.shp");
    let made = std::process::Command::new("ogr2ogr").arg(&shp).arg(&nc).output().unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    std::fs::remove_file(dir.join("nc.prj")).unwrap();
    let no_crs = inspect(stage_params(shp.to_str().unwrap(), "x"));
    assert_eq!(no_crs.kind, "missing_crs", "{no_crs}");
    let assigned = stageflow_geo::vector::inspect(
        &task("geo.vector_inspect", json!({"source": shp.to_str().unwrap(), "table": "no_prj", "srid": 4267})),
        &url,
    )
    .unwrap();
    assert_eq!((assigned["srid"].clone(), assigned["reprojected"].clone()), (json!(4267), json!(false)));

    // A table of that name with another definition is not touched.
    client.batch_execute("CREATE TABLE stageflow_geo.taken (fid bigint PRIMARY KEY, other text)").unwrap();
    let taken = inspect(stage_params(&nc, "taken"));
    assert_eq!((taken.kind.as_str(), taken.category.as_str()), ("table_exists", "permanent"), "{taken}");
    let unknown_schema = inspect(stage_params(&nc, "nowhere.t"));
    assert_eq!(unknown_schema.kind, "not_found", "{unknown_schema}");

    // Through the engine: the job fails with the categorised error on its task, not a panic.
    let (job_id, status, _) =
        run_job(&url, &mut client, "stage_vector", stage_params(&missing_under_tmp("x.geojson"), "x"), 2);
    assert_eq!(status["status"], json!("failed"), "{status}");
    let errors = task_errors(&mut client, &job_id);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(
        (errors[0].1["type"].clone(), errors[0].1["category"].clone()),
        (json!("not_found"), json!("permanent"))
    );
    let (job_id, status, _) = run_job(&url, &mut client, "stage_vector", stage_params(&nc, "taken"), 2);
    assert_eq!(status["status"], json!("failed"), "{status}");
    assert_eq!(task_errors(&mut client, &job_id)[0].1["type"], json!("table_exists"));
}

/// A file that does not exist, under the workers' roots (the temporary directory).
fn missing_under_tmp(name: &str) -> String {
    std::env::temp_dir().join("stageflow-nonexistent").join(name).to_string_lossy().into_owned()
}
