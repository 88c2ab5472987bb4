//! Generated data: bulk rows made with set-based SQL, and import files.

use chrono::Utc;
use serde_json::json;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Result, ensure};
use sqlx::Executor as _;
use tenant_worker::TenantId;
use tenant_worker::sql::copy_escape;

use super::harness::Ctx;

/// Cities of the generated properties.
const CITIES: &[&str] = &[
    "Springfield",
    "Riverton",
    "Lakeside",
    "Hillcrest",
    "Fairview",
    "Oakdale",
];

const STREETS: &[&str] = &["Elm", "Maple", "Cedar", "Birch", "Oak", "Pine"];
/// created_at of generated rows spreads over this many days before now.
const SPAN_DAYS: f64 = 730.0;
/// Id ranges of generated rows per kind (time-ordered ids, like UUIDv7).
const PROPERTY_IDS: i64 = 1 << 40;
const CUSTOMER_IDS: i64 = 2 << 40;
const INVOICE_IDS: i64 = 3 << 40;
/// Row counts per kind for [`Ctx::generate`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mix {
    pub(crate) properties: i64,
    pub(crate) customers: i64,
    pub(crate) invoices: i64,
}

impl Mix {
    /// 60% properties, 10% customers, 30% invoices (other tenants' rows).
    pub(crate) fn mixed(total: i64) -> Self {
        let properties = total * 6 / 10;
        let customers = (total / 10).max(1);
        Mix {
            properties,
            customers,
            invoices: total - properties - customers,
        }
    }
}

impl Ctx {
    pub(crate) async fn generate(&self, tenant: TenantId, mix: Mix) -> Result<()> {
        let cities: Vec<String> = CITIES.iter().map(|c| c.to_string()).collect();
        let streets: Vec<String> = STREETS.iter().map(|c| c.to_string()).collect();
        let span_secs = SPAN_DAYS * 86_400.0;
        let mut tx = self.admin.begin().await?;
        tx.execute("set local session_replication_role = replica")
            .await?;
        if mix.properties > 0 {
            sqlx::query(
                r#"insert into public.records (tenant_id, id, kind, data, created_at, updated_at)
                   select $1, lpad(to_hex($2::bigint + i), 32, '0')::uuid, 'property',
                          jsonb_build_object(
                              'name', ($5::text[])[1 + i % 6] || ' Court ' || i,
                              'address', (10 + i * 7 % 990) || ' ' || ($6::text[])[1 + i % 6] || ' Street',
                              'city', ($5::text[])[1 + (i * 13) % 6],
                              'units', 4 + (i * 17) % 60),
                          t.ts, t.ts
                   from generate_series(1, $3::int) as i,
                        lateral (select now() - make_interval(secs => $4::float8 * ($3 - i)::float8 / $3)) as t(ts)"#,
            )
            .bind(tenant)
            .bind(PROPERTY_IDS)
            .bind(mix.properties as i32)
            .bind(span_secs)
            .bind(&cities)
            .bind(&streets)
            .execute(&mut *tx)
            .await?;
        }
        if mix.customers > 0 {
            sqlx::query(
                r#"insert into public.records (tenant_id, id, kind, data, created_at, updated_at)
                   select $1, lpad(to_hex($2::bigint + i), 32, '0')::uuid, 'customer',
                          jsonb_build_object('name', 'Customer ' || i,
                                             'email', 'customer' || i || '@example.test'),
                          t.ts, t.ts
                   from generate_series(1, $3::int) as i,
                        lateral (select now() - make_interval(secs => $4::float8 * ($3 - i)::float8 / $3)) as t(ts)"#,
            )
            .bind(tenant)
            .bind(CUSTOMER_IDS)
            .bind(mix.customers as i32)
            .bind(span_secs)
            .execute(&mut *tx)
            .await?;
        }
        if mix.invoices > 0 {
            ensure!(mix.customers > 0, "invoices need customers");
            sqlx::query(
                r#"insert into public.records (tenant_id, id, kind, data, created_at, updated_at)
                   select $1, lpad(to_hex($2::bigint + i), 32, '0')::uuid, 'invoice',
                          jsonb_build_object(
                              'customer_id', lpad(to_hex($5::bigint + 1 + i % $6::int), 32, '0')::uuid,
                              'number', 'INV-' || lpad(i::text, 7, '0'),
                              'amount', round((50 + (i * 37) % 4950)::numeric + 0.99, 2),
                              'currency', (array['EUR', 'USD', 'GBP'])[1 + i % 3],
                              'status', (array['paid', 'open', 'overdue'])[1 + (i / 3) % 3],
                              'issued_on', to_char(t.ts, 'YYYY-MM-DD'),
                              'due_on', to_char(t.ts + interval '30 days', 'YYYY-MM-DD')),
                          t.ts, t.ts
                   from generate_series(1, $3::int) as i,
                        lateral (select now() - make_interval(secs => $4::float8 * ($3 - i)::float8 / $3)) as t(ts)"#,
            )
            .bind(tenant)
            .bind(INVOICE_IDS)
            .bind(mix.invoices as i32)
            .bind(span_secs)
            .bind(CUSTOMER_IDS)
            .bind(mix.customers as i32)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Import files
// ---------------------------------------------------------------------------------------------

/// Streams a COPY text file into `table` (columns in the order [`write_import_files`] writes)
/// and checks the row count.
pub(crate) async fn copy_file(
    conn: &mut sqlx::PgConnection,
    table: &str,
    path: &Path,
    expected: i64,
) -> Result<()> {
    let mut copy = conn
        .copy_in_raw(&format!(
            "copy {table} (tenant_id, id, kind, data, external_id, created_at, updated_at) from stdin"
        ))
        .await?;
    let mut f = tokio::fs::File::open(path).await?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let k = tokio::io::AsyncReadExt::read(&mut f, &mut buf).await?;
        if k == 0 {
            break;
        }
        copy.send(&buf[..k]).await?;
    }
    let copied = copy.finish().await?;
    ensure!(
        copied == expected as u64,
        "COPY into {table} loaded {copied} rows, expected {expected}"
    );
    Ok(())
}

/// The import's JSONL file and the same rows as COPY text in the table's shape (tenant_id,
/// id, kind, data, external_id, created_at, updated_at), one COPY file per (path, tenant).
pub(crate) fn write_import_files(
    jsonl: &Path,
    copies: &[(PathBuf, TenantId)],
    n: i64,
) -> Result<()> {
    let mut j = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(jsonl)?);
    let mut c = copies
        .iter()
        .map(|(path, tenant)| {
            let file = std::fs::File::create(path)?;
            Ok((std::io::BufWriter::with_capacity(1 << 20, file), *tenant))
        })
        .collect::<Result<Vec<_>>>()?;
    let now = Utc::now().to_rfc3339();
    let mut line = Vec::with_capacity(512);
    let mut row = Vec::with_capacity(512);
    for i in 1..=n {
        let u = i as usize;
        let data = json!({
            "name": format!("{} Court {i}", CITIES[u % 6]),
            "address": format!("{} {} Street", 10 + i * 7 % 990, STREETS[u % 6]),
            "city": CITIES[(u * 13) % 6],
            "units": 4 + (i * 17) % 60,
        });
        let external_id = format!("P-{i:07}");
        line.clear();
        serde_json::to_writer(
            &mut line,
            &json!({ "kind": "property", "external_id": external_id, "data": data }),
        )?;
        line.push(b'\n');
        j.write_all(&line)?;
        let data_text = data.to_string();
        for (out, tenant) in &mut c {
            row.clear();
            write!(
                row,
                "{tenant}\t{}\tproperty\t",
                uuid::Uuid::new_v4().hyphenated()
            )?;
            copy_escape(&mut row, &data_text);
            writeln!(row, "\t{external_id}\t{now}\t{now}")?;
            out.write_all(&row)?;
        }
    }
    j.flush()?;
    for (out, _) in &mut c {
        out.flush()?;
    }
    Ok(())
}
