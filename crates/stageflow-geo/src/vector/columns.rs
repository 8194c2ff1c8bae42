//! The table's columns: the layer's fields as PostgreSQL columns, and the geometry column's type.

use std::collections::{BTreeSet, HashSet};

use gdal::vector::{Layer, LayerAccess};
use gdal_sys::{OGRFieldSubType, OGRFieldType};
use serde_json::{json, Value};
use stageflow_worker::TaskError;

use crate::db::plain_identifier;

/// An attribute column: the source field's index and name, the column's name and type.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Column {
    pub(super) index: usize,
    pub(super) source: String,
    pub(super) name: String,
    pub(super) pg_type: ColumnType,
}

impl Column {
    pub(super) fn to_json(&self) -> Value {
        json!({"index": self.index, "source": self.source, "name": self.name, "type": self.pg_type.sql_name()})
    }

    pub(super) fn from_json(value: &Value) -> Result<Column, TaskError> {
        let bad = || TaskError::permanent("bad_params", format!("a malformed column in the plan: {value}"));
        Ok(Column {
            index: value["index"].as_u64().ok_or_else(bad)? as usize,
            source: value["source"].as_str().ok_or_else(bad)?.to_owned(),
            name: value["name"].as_str().filter(|n| plain_identifier(n)).ok_or_else(bad)?.to_owned(),
            pg_type: value["type"].as_str().and_then(ColumnType::named).ok_or_else(bad)?,
        })
    }
}

/// The PostgreSQL type of an attribute column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ColumnType {
    Integer,
    Bigint,
    DoublePrecision,
    /// `numeric` without a precision.
    Numeric,
    Text,
    Date,
    TimestampTz,
    Boolean,
}

impl ColumnType {
    const ALL: [ColumnType; 8] = [
        ColumnType::Integer,
        ColumnType::Bigint,
        ColumnType::DoublePrecision,
        ColumnType::Numeric,
        ColumnType::Text,
        ColumnType::Date,
        ColumnType::TimestampTz,
        ColumnType::Boolean,
    ];

    /// Of an OGR field. Reals with a declared width (Shapefile's decimals) become `numeric` without a
    /// precision, so that values wider than the declaration (Natural Earth's `pop_est`) still fit;
    /// other reals are `double precision`.
    fn of(field_type: OGRFieldType::Type, subtype: OGRFieldSubType::Type, width: i32) -> ColumnType {
        match field_type {
            OGRFieldType::OFTInteger if subtype == OGRFieldSubType::OFSTBoolean => ColumnType::Boolean,
            OGRFieldType::OFTInteger => ColumnType::Integer,
            OGRFieldType::OFTInteger64 => ColumnType::Bigint,
            OGRFieldType::OFTReal if width > 0 => ColumnType::Numeric,
            OGRFieldType::OFTReal => ColumnType::DoublePrecision,
            OGRFieldType::OFTDate => ColumnType::Date,
            OGRFieldType::OFTDateTime => ColumnType::TimestampTz,
            _ => ColumnType::Text,
        }
    }

    /// By its SQL type name, as a plan carries it.
    fn named(name: &str) -> Option<ColumnType> {
        ColumnType::ALL.into_iter().find(|t| t.sql_name() == name)
    }

    /// The SQL type name, as `format_type` writes it: the table's definition, and what an existing
    /// table's columns are compared with.
    pub(super) fn sql_name(self) -> &'static str {
        match self {
            ColumnType::Integer => "integer",
            ColumnType::Bigint => "bigint",
            ColumnType::DoublePrecision => "double precision",
            ColumnType::Numeric => "numeric",
            ColumnType::Text => "text",
            ColumnType::Date => "date",
            ColumnType::TimestampTz => "timestamp with time zone",
            ColumnType::Boolean => "boolean",
        }
    }
}

/// A field name as a plain lowercase identifier.
fn launder(name: &str) -> String {
    let mut out: String = name
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' { c } else { '_' })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out.truncate(58);
    out
}

pub(super) fn columns_of(layer: &Layer) -> Vec<Column> {
    let mut used: HashSet<String> = ["fid".to_owned(), "geom".to_owned()].into();
    // SAFETY: layer.c_layer() is the live layer `layer` borrows; the definition it returns belongs
    // to the layer and is only read while `layer` is borrowed here.
    let defn = unsafe { gdal_sys::OGR_L_GetLayerDefn(layer.c_layer()) };
    let mut columns = Vec::new();
    for (index, field) in layer.defn().fields().enumerate() {
        // SAFETY: `index` comes from enumerating this layer's fields, so it is a valid field index of
        // `defn`, which the borrowed layer keeps alive.
        let subtype = unsafe { gdal_sys::OGR_Fld_GetSubType(gdal_sys::OGR_FD_GetFieldDefn(defn, index as i32)) };
        let base = launder(&field.name());
        let mut name = base.clone();
        let mut n = 2;
        while used.contains(&name) {
            name = format!("{base}_{n}");
            n += 1;
        }
        used.insert(name.clone());
        columns.push(Column {
            index,
            source: field.name(),
            name,
            pg_type: ColumnType::of(field.field_type(), subtype, field.width()),
        });
    }
    columns
}

const GEOMETRY_NAMES: [&str; 8] = [
    "Geometry",
    "Point",
    "LineString",
    "Polygon",
    "MultiPoint",
    "MultiLineString",
    "MultiPolygon",
    "GeometryCollection",
];

/// The column's geometry type for the flat OGR types seen (`declared` when no feature has a
/// geometry) and whether single parts must be promoted to multi.
pub(super) fn column_geometry_type(seen: &BTreeSet<u32>, declared: u32) -> (&'static str, bool) {
    let name = |t: u32| GEOMETRY_NAMES.get(t as usize).copied().unwrap_or("Geometry");
    match seen.len() {
        0 => (name(declared), false),
        1 => (name(*seen.iter().next().unwrap_or(&0)), false),
        2 => {
            let (a, b) = (*seen.iter().next().unwrap_or(&0), *seen.iter().nth(1).unwrap_or(&0));
            if (1..=3).contains(&a) && b == a + 3 {
                (name(b), true)
            } else {
                ("Geometry", false)
            }
        }
        _ => ("Geometry", false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_types_are_read_back_by_their_sql_names() {
        let names = ColumnType::ALL.map(ColumnType::sql_name);
        assert_eq!(
            names,
            ["integer", "bigint", "double precision", "numeric", "text", "date", "timestamp with time zone", "boolean"]
        );
        for t in ColumnType::ALL {
            assert_eq!(ColumnType::named(t.sql_name()), Some(t));
        }
        assert_eq!(ColumnType::named("timestamptz"), None);
    }

    #[test]
    fn geometry_types_promote_within_one_family() {
        let set = |v: &[u32]| v.iter().copied().collect::<BTreeSet<u32>>();
        assert_eq!(column_geometry_type(&set(&[3, 6]), 3), ("MultiPolygon", true));
        assert_eq!(column_geometry_type(&set(&[1]), 0), ("Point", false));
        assert_eq!(column_geometry_type(&set(&[1, 3]), 0), ("Geometry", false));
        assert_eq!(column_geometry_type(&set(&[]), 2), ("LineString", false));
        assert_eq!(launder("CNTY_ID"), "cnty_id");
        assert_eq!(launder("1st name"), "_1st_name");
    }
}
