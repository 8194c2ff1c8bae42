//! Rows for `COPY ... (FORMAT binary)`: a feature's fields as cells, its geometry as PostGIS's EWKB,
//! and PostgreSQL's binary `numeric`.

use std::error::Error;

use bytes::{BufMut, BytesMut};
use chrono::{DateTime, NaiveDate, Utc};
use gdal::vector::{Feature, Geometry};
use postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use stageflow_worker::TaskError;

use super::columns::{Column, ColumnType};

/// The WKB of a geometry as PostGIS's EWKB with `srid`: Z kept or dropped, M dropped, a single part
/// wrapped into a one-part multi when `promote`.
pub(super) fn ewkb(geometry: &Geometry, srid: i32, keep_z: bool, promote: bool) -> Result<Vec<u8>, TaskError> {
    let geometry = geometry.clone();
    // SAFETY: `geometry` is an owned clone; these calls only change that clone, which stays alive
    // for the whole block.
    unsafe {
        gdal_sys::OGR_G_SetMeasured(geometry.c_geometry(), 0);
        if !keep_z {
            gdal_sys::OGR_G_Set3D(geometry.c_geometry(), 0);
        }
    }
    let wkb =
        geometry.iso_wkb().map_err(|e| TaskError::permanent("unreadable", format!("a geometry has no WKB: {e}")))?;
    if wkb.len() < 5 {
        return Err(TaskError::permanent("unreadable", "a geometry's WKB is truncated"));
    }
    let little = wkb[0] == 1;
    let raw = [wkb[1], wkb[2], wkb[3], wkb[4]];
    let iso_type = if little { u32::from_le_bytes(raw) } else { u32::from_be_bytes(raw) };
    let (flat, dims) = (iso_type % 1000, iso_type / 1000);
    let z_flag = if dims == 1 || dims == 3 { 0x8000_0000u32 } else { 0 };
    let mut out = Vec::with_capacity(wkb.len() + 13);
    if promote && (1..=3).contains(&flat) {
        // A one-part multi (little-endian header, one part), the part's own WKB after it.
        out.push(1);
        out.extend_from_slice(&((flat + 3) | z_flag | 0x2000_0000).to_le_bytes());
        out.extend_from_slice(&srid.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&wkb);
    } else {
        // The same geometry with EWKB's type flags and the SRID, in the WKB's own byte order.
        let ewkb_type = flat | z_flag | 0x2000_0000;
        out.push(wkb[0]);
        out.extend_from_slice(&if little { ewkb_type.to_le_bytes() } else { ewkb_type.to_be_bytes() });
        out.extend_from_slice(&if little { srid.to_le_bytes() } else { srid.to_be_bytes() });
        out.extend_from_slice(&wkb[5..]);
    }
    Ok(out)
}

/// One value of a row for `COPY ... (FORMAT binary)`.
#[derive(Debug)]
pub(super) enum Cell {
    Null,
    Int(i32),
    Big(i64),
    Float(f64),
    /// A `numeric`, from a double (what OGR gives for Shapefile decimals).
    Numeric(f64),
    Text(String),
    Date(NaiveDate),
    Timestamp(DateTime<Utc>),
    Bool(bool),
    /// EWKB with an SRID, for a `geometry` column.
    Geometry(Vec<u8>),
}

impl ToSql for Cell {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        match self {
            Cell::Null => Ok(IsNull::Yes),
            Cell::Int(v) => v.to_sql_checked(ty, out),
            Cell::Big(v) => v.to_sql_checked(ty, out),
            Cell::Float(v) => v.to_sql_checked(ty, out),
            Cell::Text(v) => v.to_sql_checked(ty, out),
            Cell::Date(v) => v.to_sql_checked(ty, out),
            Cell::Timestamp(v) => v.to_sql_checked(ty, out),
            Cell::Bool(v) => v.to_sql_checked(ty, out),
            Cell::Numeric(v) if *ty == Type::NUMERIC => {
                encode_numeric(*v, out);
                Ok(IsNull::No)
            }
            Cell::Geometry(bytes) if ty.name() == "geometry" => {
                out.put_slice(bytes);
                Ok(IsNull::No)
            }
            other => Err(format!("cannot write {other:?} into a column of type {ty}").into()),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// PostgreSQL's binary `numeric`: digit count, weight, sign, display scale, base-10000 digits.
fn encode_numeric(value: f64, out: &mut BytesMut) {
    const NAN: u16 = 0xC000;
    const PINF: u16 = 0xD000;
    const NINF: u16 = 0xF000;
    let special = if value.is_nan() {
        Some(NAN)
    } else if value.is_infinite() {
        Some(if value > 0.0 { PINF } else { NINF })
    } else {
        None
    };
    if let Some(sign) = special {
        out.put_i16(0);
        out.put_i16(0);
        out.put_u16(sign);
        out.put_u16(0);
        return;
    }
    // Rust prints a finite double as the shortest decimal that reads back the same, never with an
    // exponent.
    let text = format!("{}", value.abs());
    let (int_part, frac_part) = text.split_once('.').unwrap_or((&text, ""));
    let int_part = int_part.trim_start_matches('0');
    let dscale = frac_part.len() as u16;
    let int_padded = format!("{}{int_part}", "0".repeat((4 - int_part.len() % 4) % 4));
    let frac_padded = format!("{frac_part}{}", "0".repeat((4 - frac_part.len() % 4) % 4));
    let mut digits: Vec<i16> = int_padded
        .as_bytes()
        .chunks(4)
        .chain(frac_padded.as_bytes().chunks(4))
        .map(|chunk| chunk.iter().fold(0i16, |acc, d| acc * 10 + (d - b'0') as i16))
        .collect();
    let mut weight = (int_padded.len() / 4) as i16 - 1;
    while digits.first() == Some(&0) {
        digits.remove(0);
        weight -= 1;
    }
    while digits.last() == Some(&0) {
        digits.pop();
    }
    if digits.is_empty() {
        weight = 0;
    }
    out.put_i16(digits.len() as i16);
    out.put_i16(weight);
    out.put_u16(if value < 0.0 && !digits.is_empty() { 0x4000 } else { 0 });
    out.put_u16(dscale);
    for d in digits {
        out.put_i16(d);
    }
}

pub(super) fn read_cell(feature: &Feature, column: &Column) -> Result<Cell, TaskError> {
    let unreadable =
        |e: gdal::errors::GdalError| TaskError::permanent("unreadable", format!("field {:?}: {e}", column.source));
    let i = column.index;
    Ok(match column.pg_type {
        ColumnType::Integer => feature.field_as_integer(i).map_err(unreadable)?.map_or(Cell::Null, Cell::Int),
        ColumnType::Boolean => {
            feature.field_as_integer(i).map_err(unreadable)?.map_or(Cell::Null, |v| Cell::Bool(v != 0))
        }
        ColumnType::Bigint => feature.field_as_integer64(i).map_err(unreadable)?.map_or(Cell::Null, Cell::Big),
        ColumnType::DoublePrecision => feature.field_as_double(i).map_err(unreadable)?.map_or(Cell::Null, Cell::Float),
        ColumnType::Numeric => feature.field_as_double(i).map_err(unreadable)?.map_or(Cell::Null, Cell::Numeric),
        ColumnType::Date => {
            feature.field_as_datetime(i).map_err(unreadable)?.map_or(Cell::Null, |d| Cell::Date(d.date_naive()))
        }
        ColumnType::TimestampTz => feature
            .field_as_datetime(i)
            .map_err(unreadable)?
            .map_or(Cell::Null, |d| Cell::Timestamp(d.with_timezone(&Utc))),
        ColumnType::Text => feature.field_as_string(i).map_err(unreadable)?.map_or(Cell::Null, Cell::Text),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric_text(v: f64) -> (i16, i16, u16, u16, Vec<i16>) {
        let mut out = BytesMut::new();
        encode_numeric(v, &mut out);
        let b = out.to_vec();
        let word = |i: usize| i16::from_be_bytes([b[2 * i], b[2 * i + 1]]);
        let n = word(0);
        (n, word(1), word(2) as u16, word(3) as u16, (0..n as usize).map(|i| word(4 + i)).collect())
    }

    #[test]
    fn numerics_in_postgres_binary_form() {
        // 35623680 = 3562 * 10000 + 3680: two digits, weight 1.
        assert_eq!(numeric_text(35623680.0), (2, 1, 0, 0, vec![3562, 3680]));
        // -12.345 = -(12 + 3450/10000): scale 3.
        assert_eq!(numeric_text(-12.345), (2, 0, 0x4000, 3, vec![12, 3450]));
        // 0.00012 = 1.2 * 10^-4: weight -1, digit 1 then 2000.
        assert_eq!(numeric_text(0.00012), (2, -1, 0, 5, vec![1, 2000]));
        assert_eq!(numeric_text(0.0), (0, 0, 0, 0, vec![]));
        assert_eq!(numeric_text(1e20), (1, 5, 0, 0, vec![1]));
        assert_eq!(numeric_text(f64::NAN).2, 0xC000);
    }
}
