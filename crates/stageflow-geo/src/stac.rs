//! Stage 4 of process_raster: a STAC 1.0 Collection and one Item per tile, with the projection and
//! raster extensions, written as JSON next to the COGs (a local directory or an S3 prefix).

use serde_json::{json, Value};
use stageflow_worker::{Task, TaskError};

use crate::raster::param_str;

const PROJECTION: &str = "https://stac-extensions.github.io/projection/v1.1.0/schema.json";
const RASTER: &str = "https://stac-extensions.github.io/raster/v1.1.0/schema.json";

fn polygon(b: &[f64]) -> Value {
    json!({"type": "Polygon", "coordinates": [[[b[0], b[1]], [b[2], b[1]], [b[2], b[3]], [b[0], b[3]], [b[0], b[1]]]]})
}

fn bbox(value: &Value) -> Result<Vec<f64>, TaskError> {
    value
        .as_array()
        .filter(|a| a.len() == 4)
        .map(|a| a.iter().filter_map(Value::as_f64).collect::<Vec<_>>())
        .filter(|a| a.len() == 4)
        .ok_or_else(|| TaskError::permanent("bad_input", format!("not a bbox: {value}")))
}

fn write(path: &str, document: &Value) -> Result<(), TaskError> {
    let bytes = serde_json::to_vec_pretty(document).map_err(|e| TaskError::permanent("json", e.to_string()))?;
    crate::vsi::write_file(path, &bytes)
}

pub fn write_catalog(task: &Task) -> Result<Value, TaskError> {
    let location = param_str(task, "output")?.trim_end_matches('/');
    let output = crate::vsi::gdal_path(location)?;
    let source = param_str(task, "source")?;
    let tiles = task.inputs.as_ref().and_then(Value::as_array).cloned().unwrap_or_default();
    if tiles.is_empty() {
        return Err(TaskError::permanent("no_tiles", "the cog stage produced no tiles"));
    }
    let collection_id =
        std::path::Path::new(source).file_stem().and_then(|s| s.to_str()).unwrap_or("raster").to_owned();

    let mut extent = [f64::INFINITY, f64::INFINITY, f64::NEG_INFINITY, f64::NEG_INFINITY];
    let now = "1970-01-01T00:00:00Z";
    let datetime = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let datetime = format_rfc3339(datetime).unwrap_or_else(|| now.to_owned());
    let mut links = vec![
        json!({"rel": "root", "href": "./collection.json", "type": "application/json"}),
        json!({"rel": "self", "href": "./collection.json", "type": "application/json"}),
    ];
    for tile in &tiles {
        let key = tile["key"].as_str().ok_or_else(|| TaskError::permanent("bad_input", "a tile result without key"))?;
        let wgs84 = bbox(&tile["bounds_wgs84"])?;
        for i in 0..2 {
            extent[i] = extent[i].min(wgs84[i]);
            extent[i + 2] = extent[i + 2].max(wgs84[i + 2]);
        }
        let bands: Vec<Value> = tile["bands"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| {
                // The raster extension's nodata is a number or "nan"/"inf"/"-inf": a band without
                // one has no `nodata` (null is invalid).
                let mut band = json!({"data_type": stac_data_type(b["data_type"].as_str().unwrap_or(""))});
                if !b["nodata"].is_null() {
                    band["nodata"] = b["nodata"].clone();
                }
                band
            })
            .collect();
        let item = json!({
            "type": "Feature",
            "stac_version": "1.0.0",
            "stac_extensions": [PROJECTION, RASTER],
            "id": key,
            "collection": collection_id,
            "bbox": wgs84,
            "geometry": polygon(&wgs84),
            "properties": {
                "datetime": datetime,
                "proj:epsg": tile["crs"]["epsg"],
                "proj:bbox": tile["bounds"],
                "proj:shape": [tile["height"], tile["width"]],
            },
            "assets": {"data": {
                "href": format!("../{key}.tif"),
                "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                "roles": ["data"],
                "raster:bands": bands,
            }},
            "links": [
                {"rel": "collection", "href": "../collection.json", "type": "application/json"},
                {"rel": "parent", "href": "../collection.json", "type": "application/json"},
                {"rel": "root", "href": "../collection.json", "type": "application/json"},
            ],
        });
        write(&format!("{output}/items/{key}.json"), &item)?;
        links.push(json!({"rel": "item", "href": format!("./items/{key}.json"), "type": "application/geo+json"}));
    }
    let collection = json!({
        "type": "Collection",
        "stac_version": "1.0.0",
        "stac_extensions": [PROJECTION],
        "id": collection_id,
        "description": format!("Cloud-Optimized GeoTIFF tiles of {source}"),
        "license": "proprietary",
        "extent": {"spatial": {"bbox": [extent]}, "temporal": {"interval": [[datetime, null]]}},
        "links": links,
    });
    write(&format!("{output}/collection.json"), &collection)?;
    Ok(json!({"collection": format!("{location}/collection.json"), "items": tiles.len(), "bbox": extent}))
}

/// The raster extension's name for a GDAL data type.
fn stac_data_type(gdal: &str) -> String {
    match gdal {
        "Byte" => "uint8".to_owned(),
        "CInt16" => "cint16".to_owned(),
        "CInt32" => "cint32".to_owned(),
        "CFloat32" => "cfloat32".to_owned(),
        "CFloat64" => "cfloat64".to_owned(),
        other => other.to_lowercase(),
    }
}

/// Seconds since the epoch as an RFC 3339 UTC timestamp (civil-from-days, no time crate needed).
fn format_rfc3339(secs: u64) -> Option<String> {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    Some(format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60))
}

#[cfg(test)]
mod unit {
    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(super::format_rfc3339(0).unwrap(), "1970-01-01T00:00:00Z");
        assert_eq!(super::format_rfc3339(1_795_000_000).unwrap(), "2026-11-18T11:06:40Z");
    }
}
