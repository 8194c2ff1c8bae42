//! export_geoparquet of a real table (North Carolina counties, loaded with stage_vector), through
//! the engine with the worker runtime; the file is checked by independent readers: pyarrow (the
//! `geo` metadata) and geopandas (rows, CRS, validity, attribute values), from the venv that
//! scripts/setup.sh makes.

// Test code: a panic (unwrap, expect) is how a test reports a failure.
#![allow(clippy::unwrap_used)]

mod jobs;

use std::process::Command;

use jobs::*;
use serde_json::{json, Value};

fn python() -> String {
    let python =
        std::env::var("STAGEFLOW_PYTOOLS_PYTHON").unwrap_or_else(|_| "/var/tmp/stageflow-pytools/bin/python".into());
    assert!(std::path::Path::new(&python).exists(), "{python} is missing: scripts/setup.sh makes the venv");
    python
}

/// What pyarrow and geopandas read from the file, as JSON.
const READ_BACK: &str = r#"
import json, sys
import pyarrow.parquet as pq
import geopandas
path = sys.argv[1]
meta = pq.read_metadata(path)
geo = json.loads(meta.metadata[b"geo"])
gdf = geopandas.read_parquet(path)
rows = {}
for fid in (1, 50, 100):
    row = gdf[gdf["fid"] == fid].iloc[0]
    rows[str(fid)] = {"name": row["name"], "area": float(row["area"]), "cress_id": int(row["cress_id"]),
                      "geometry_area": float(row["geom"].area)}
print(json.dumps({
    "geo": geo,
    "num_rows": meta.num_rows,
    "rows": len(gdf),
    "epsg": gdf.crs.to_epsg() if gdf.crs is not None else None,
    "all_valid": bool(gdf.geometry.is_valid.all()),
    "geometry_column": gdf.geometry.name,
    "geom_types": sorted(set(gdf.geometry.geom_type)),
    "values": rows,
    "arrow_types": {f.name: str(f.type) for f in pq.read_schema(path)},
}))
"#;

#[test]
fn exports_the_nc_counties_to_geoparquet_that_pyarrow_and_geopandas_read() {
    let (url, mut client) = geo_database("geo_export_nc");
    let nc = geodata(NC);
    let (_, loaded, _) = run_job(&url, &mut client, "stage_vector", stage_params(&nc, "nc"), 2);
    assert_eq!(loaded["status"], json!("completed"), "{loaded}");
    assert_eq!(result_of(&mut client, &loaded)["invalid_geometries"]["count"], json!(0));

    let dir = std::env::temp_dir().join("stageflow-geo-export");
    let _ = std::fs::remove_dir_all(&dir);
    let output = dir.join("nc.parquet");
    let (_, status, elapsed) =
        run_job(&url, &mut client, "export_geoparquet", json!({"table": "nc", "output": output.to_str().unwrap()}), 2);
    assert_eq!(status["status"], json!("completed"), "{status}");
    let result = &result_of(&mut client, &status);
    eprintln!("export_geoparquet nc: {:.3} s, {} bytes", elapsed.as_secs_f64(), result["bytes"]);
    assert_eq!(result["rows"], json!(100), "{result}");
    assert_eq!(result["crs"]["epsg"], json!(4267));
    assert_eq!(result["bytes"], json!(std::fs::metadata(&output).unwrap().len()));
    assert_eq!(temporary_files(&dir), Vec::<String>::new(), "the temporary file was renamed");

    let out = Command::new(python()).arg("-c").arg(READ_BACK).arg(&output).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let read: Value = serde_json::from_slice(&out.stdout).unwrap();

    // pyarrow: the geo metadata.
    let geo = &read["geo"];
    assert_eq!(geo["version"], json!("1.1.0"), "{geo}");
    assert_eq!(geo["primary_column"], json!("geom"));
    let column = &geo["columns"]["geom"];
    assert_eq!(column["encoding"], json!("WKB"));
    assert_eq!(column["geometry_types"], json!(["MultiPolygon"]));
    assert_eq!(column["crs"]["id"], json!({"authority": "EPSG", "code": 4267}), "PROJJSON, not an EPSG string");
    let extent = client
        .query_one("SELECT ST_XMin(e), ST_YMin(e), ST_XMax(e), ST_YMax(e) FROM (SELECT ST_Extent(geom)::box3d e FROM stageflow_geo.nc) s", &[])
        .unwrap();
    let bbox: Vec<f64> = column["bbox"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    for (i, corner) in bbox.iter().enumerate() {
        let expected: f64 = extent.get(i);
        assert!((corner - expected).abs() < 1e-9, "bbox {bbox:?} vs PostGIS's extent at {i}: {expected}");
    }
    assert_eq!(result["bbox"], column["bbox"]);
    assert_eq!(read["num_rows"], json!(100));
    assert_eq!(read["arrow_types"]["cress_id"], json!("int32"));
    assert_eq!(read["arrow_types"]["fid"], json!("int64"));
    assert_eq!(read["arrow_types"]["name"], json!("string"));

    // geopandas: rows, CRS, validity and values equal to PostGIS's.
    assert_eq!(read["rows"], json!(100));
    assert_eq!(read["epsg"], json!(4267));
    assert_eq!(read["all_valid"], json!(true));
    assert_eq!(read["geometry_column"], json!("geom"));
    assert_eq!(read["geom_types"], json!(["MultiPolygon"]));
    for fid in [1i64, 50, 100] {
        let row = client
            .query_one("SELECT name, area, cress_id, ST_Area(geom) FROM stageflow_geo.nc WHERE fid = $1", &[&fid])
            .unwrap();
        let (name, area, cress_id, geometry_area): (String, f64, i32, f64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let got = &read["values"][fid.to_string()];
        assert_eq!(
            (got["name"].clone(), got["area"].clone(), got["cress_id"].clone()),
            (json!(name), json!(area), json!(cress_id)),
            "fid {fid}"
        );
        assert!((got["geometry_area"].as_f64().unwrap() - geometry_area).abs() < 1e-12, "fid {fid}");
    }

    // Another job (other params, another id) exporting to the same path does not replace the
    // file: it carries the first job's mark (see confine).
    let first = std::fs::read(&output).unwrap();
    let (again_id, again, _) = run_job(
        &url,
        &mut client,
        "export_geoparquet",
        json!({"table": "stageflow_geo.nc", "output": output.to_str().unwrap()}),
        2,
    );
    assert_eq!(again["status"], json!("failed"), "{again}");
    assert_eq!(task_errors(&mut client, &again_id)[0].1["type"], json!("forbidden_path"));
    assert_eq!(std::fs::read(&output).unwrap(), first, "the file is the first job's, whole");
    assert_eq!(temporary_files(&dir), Vec::<String>::new(), "the temporary file was renamed");
}

#[test]
fn exports_wide_numerics_points_and_other_types() {
    let (url, mut client) = geo_database("geo_export_types");
    client
        .batch_execute(
            "CREATE TABLE stageflow_geo.places (id int PRIMARY KEY, label varchar(20), big numeric, seen date, at timestamptz, ok boolean, \
                 small smallint, geom geometry(Point, 3857));
             INSERT INTO stageflow_geo.places VALUES
               (1, 'a', 123456789012345678, '2024-02-29', '2024-02-29 12:00:00+00', true, 7, ST_SetSRID(ST_MakePoint(100, 200), 3857)),
               (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
        )
        .unwrap();
    let output = std::env::temp_dir().join("stageflow-geo-export-types.parquet");
    let _ = std::fs::remove_file(&output);
    let (_, status, _) = run_job(
        &url,
        &mut client,
        "export_geoparquet",
        json!({"table": "stageflow_geo.places", "output": output.to_str().unwrap()}),
        2,
    );
    assert_eq!(status["status"], json!("completed"), "{status}");
    assert_eq!(result_of(&mut client, &status)["crs"]["epsg"], json!(3857));
    let script = r#"
import json, sys
import pyarrow.parquet as pq
import geopandas
t = pq.read_table(sys.argv[1])
gdf = geopandas.read_parquet(sys.argv[1])
print(json.dumps({"types": {f.name: str(f.type) for f in t.schema}, "rows": t.to_pylist(),
                  "epsg": gdf.crs.to_epsg(), "x": gdf.geometry.iloc[0].x, "null_geometry": gdf.geometry.iloc[1] is None,
                  "geo": json.loads(pq.read_metadata(sys.argv[1]).metadata[b"geo"])}, default=str))
"#;
    let out = Command::new(python()).arg("-c").arg(script).arg(&output).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let read: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        read["types"],
        json!({"id": "int32", "label": "string", "big": "double", "seen": "date32[day]", "at": "timestamp[us, tz=UTC]",
               "ok": "bool", "small": "int16", "geom": "binary"}),
        "{read}"
    );
    let first = &read["rows"][0];
    assert_eq!(
        (first["label"].clone(), first["big"].clone(), first["seen"].clone(), first["ok"].clone()),
        (json!("a"), json!(123456789012345678.0f64), json!("2024-02-29"), json!(true))
    );
    assert_eq!(first["at"], json!("2024-02-29 12:00:00+00:00"));
    assert_eq!(read["rows"][1]["label"], Value::Null);
    assert_eq!(
        (read["epsg"].clone(), read["x"].clone(), read["null_geometry"].clone()),
        (json!(3857), json!(100.0), json!(true))
    );
    assert_eq!(read["geo"]["columns"]["geom"]["geometry_types"], json!(["Point"]));
}

/// The files of `dir` whose names end in `.tmp` (what a write leaves while it runs).
fn temporary_files(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".tmp"))
        .collect()
}

#[test]
fn a_missing_table_is_a_categorised_error() {
    let (url, mut client) = geo_database("geo_export_missing");
    let output = std::env::temp_dir().join("stageflow-geo-export-missing.parquet");
    let _ = std::fs::remove_file(&output);
    let (job_id, status, _) = run_job(
        &url,
        &mut client,
        "export_geoparquet",
        json!({"table": "no_such_table", "output": output.to_str().unwrap()}),
        2,
    );
    assert_eq!(status["status"], json!("failed"), "{status}");
    let errors = task_errors(&mut client, &job_id);
    assert_eq!(
        (errors[0].1["type"].clone(), errors[0].1["category"].clone()),
        (json!("not_found"), json!("permanent")),
        "{errors:?}"
    );
    assert!(!output.exists());

    let direct = |params: Value| {
        stageflow_geo::geoparquet_export::write(&task("geo.geoparquet_write", params), &url).unwrap_err()
    };
    let missing = direct(json!({"table": "public.nothing", "output": output.to_str().unwrap()}));
    assert_eq!(missing.kind, "not_found", "{missing}");
    assert!(!output.exists());
    let bad = direct(json!({"table": "Robert'); DROP TABLE x;--", "output": output.to_str().unwrap()}));
    assert_eq!(bad.kind, "bad_params", "{bad}");
    client.batch_execute("CREATE TABLE public.no_geometry (id int)").unwrap();
    let flat = direct(json!({"table": "public.no_geometry", "output": output.to_str().unwrap()}));
    assert_eq!(flat.kind, "unsupported_format", "{flat}");
}
