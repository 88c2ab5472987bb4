-- Bucket columns for the built-in rollups, kept by the database. Plain date columns (compared
-- with leak-proof operators) so that bucket-restricted recomputation can use the indexes even
-- under RLS, where non-leakproof expressions cannot be index quals.
alter table public.records
    add column created_day date generated always as ((created_at at time zone 'UTC')::date) stored,
    -- Built from immutable pieces (a text-to-date cast depends on DateStyle); issued_on is
    -- guaranteed to look like YYYY-MM-DD by the invoice_fields_typed check.
    add column invoice_month date generated always as (
        case when kind = 'invoice' and data ? 'issued_on'
             then make_date(substr(data ->> 'issued_on', 1, 4)::integer,
                            substr(data ->> 'issued_on', 6, 2)::integer, 1) end
    ) stored;
create index records_tenant_created_day on public.records (tenant_id, created_day);
create index records_tenant_invoice_month on public.records (tenant_id, invoice_month)
    where kind = 'invoice';

-- Analytics rollups: per-tenant aggregates, upserted so re-running gives the same table.
-- Built-in rollups fill count (and sum where there is an amount); declared rollups fill sum
-- with their `value`.
create table public.rollups (
    tenant_id uuid not null references public.tenants (id),
    name text not null check (name ~ '^[a-z][a-z0-9_]{0,62}$'),
    bucket date not null,
    dims jsonb not null default '{}' check (jsonb_typeof(dims) = 'object'),
    count bigint,
    sum numeric,
    updated_at timestamptz not null default now(),
    primary key (tenant_id, name, bucket, dims)
);

-- Which rollup buckets changed since the last incremental run. Written by statement-level
-- triggers on records (old and new bucket values, so updates that move a row between buckets
-- and deletes are seen); consumed (deleted) by the incremental run that recomputes them, so a
-- change committed late is picked up by the next run rather than lost behind a watermark.
create table public.rollup_changes (
    tenant_id uuid not null references public.tenants (id),
    seq bigint generated always as identity,
    name text not null,
    bucket date not null,
    changed_at timestamptz not null default now(),
    primary key (tenant_id, seq)
);
create index rollup_changes_tenant_name on public.rollup_changes (tenant_id, name);

-- The last full or incremental run per rollup (shown by `rollups show`).
create table public.rollup_runs (
    tenant_id uuid not null references public.tenants (id),
    name text not null,
    mode text not null check (mode in ('full', 'incremental')),
    ran_at timestamptz not null default now(),
    primary key (tenant_id, name)
);

do $$
declare t text;
begin
    foreach t in array array['rollups', 'rollup_changes', 'rollup_runs'] loop
        execute format('alter table public.%I enable row level security', t);
        execute format('alter table public.%I force row level security', t);
        execute format($p$create policy tenant_isolation on public.%I as restrictive for all to public
            using (tenant_id = public.current_tenant_id())
            with check (tenant_id = public.current_tenant_id())$p$, t);
        execute format($p$create policy tenant_access on public.%I as permissive for all to public
            using (tenant_id = public.current_tenant_id())
            with check (tenant_id = public.current_tenant_id())$p$, t);
    end loop;
end $$;

create function public.log_rollup_changes() returns trigger
    language plpgsql
    as $$
begin
    if tg_op in ('INSERT', 'UPDATE') then
        insert into public.rollup_changes (tenant_id, name, bucket)
        select distinct n.tenant_id, 'records_per_kind_per_day', n.created_day from new_rows n
        union
        select distinct n.tenant_id, 'invoices_per_month', n.invoice_month from new_rows n
        where n.invoice_month is not null;
    end if;
    if tg_op in ('UPDATE', 'DELETE') then
        insert into public.rollup_changes (tenant_id, name, bucket)
        select distinct o.tenant_id, 'records_per_kind_per_day', o.created_day from old_rows o
        union
        select distinct o.tenant_id, 'invoices_per_month', o.invoice_month from old_rows o
        where o.invoice_month is not null;
    end if;
    return null;
end $$;

create trigger records_rollup_changes_ins after insert on public.records
    referencing new table as new_rows
    for each statement execute function public.log_rollup_changes();
create trigger records_rollup_changes_upd after update on public.records
    referencing old table as old_rows new table as new_rows
    for each statement execute function public.log_rollup_changes();
create trigger records_rollup_changes_del after delete on public.records
    referencing old table as old_rows
    for each statement execute function public.log_rollup_changes();
