-- The tenant data layer: one shared `records` table read through per-kind views, with
-- Row-Level Security ENABLED and FORCED so that even the views' owner is filtered.
--
-- This file runs as the owner role (setup does `set role <owner>`), so every object below is
-- owned by it. Grants to the app, queue and scheduler roles are applied by `tenant-worker setup`
-- after the migrations, because role names are configurable.

-- The tenant of the current transaction, or NULL when none is set.
--
-- `current_setting(.., true)` returns NULL when the setting was never set and '' after a
-- transaction-local setting ended on a pooled connection; nullif turns both into NULL, and
-- `tenant_id = NULL` matches no row. A garbage value fails the uuid cast, so the query errors.
-- All three cases fail closed. STABLE, never IMMUTABLE: a cached plan must not reuse one
-- tenant's value for another.
create function public.current_tenant_id() returns uuid
    language sql stable parallel safe
    as $$ select nullif(current_setting('app.tenant_id', true), '')::uuid $$;

-- One row per customer organisation. Not tenant data itself, but the app role may only see
-- its own tenant's row (to check that the tenant exists and is active).
create table public.tenants (
    id uuid primary key,
    name text not null check (length(name) between 1 and 200),
    status text not null default 'active' check (status in ('active', 'suspended')),
    created_at timestamptz not null default now()
);

alter table public.tenants enable row level security;
alter table public.tenants force row level security;
create policy tenant_self on public.tenants as permissive for select to public
    using (id = public.current_tenant_id());

-- Every customer's records, in one table. Keyed (tenant_id, id): primary, unique and foreign
-- key checks bypass RLS, so every key includes tenant_id and a check can never reveal that
-- another tenant's row exists.
create table public.records (
    tenant_id uuid not null references public.tenants (id),
    id uuid not null default gen_random_uuid(),
    kind text not null check (kind ~ '^[a-z][a-z0-9_]{0,39}$'),
    data jsonb not null check (jsonb_typeof(data) = 'object'),
    external_id text check (external_id is null or length(external_id) between 1 and 200),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    -- Derived key of an invoice's customer: the JSON reference as a real column so the
    -- database can enforce it with a foreign key.
    customer_ref uuid generated always as (
        case when kind = 'invoice' then (data ->> 'customer_id')::uuid end
    ) stored,
    customer_ref_kind text generated always as (
        case when kind = 'invoice' then 'customer' end
    ) stored,
    primary key (tenant_id, id),
    -- Target of the invoice -> customer foreign key (id alone is unique per tenant already).
    constraint records_tenant_id_kind_key unique (tenant_id, id, kind),
    -- Rule: an invoice's customer_id names an existing customer record of the SAME tenant.
    -- Dangling and cross-tenant references fail alike; deleting a referenced customer fails.
    constraint invoice_customer_must_exist
        foreign key (tenant_id, customer_ref, customer_ref_kind)
        references public.records (tenant_id, id, kind),
    constraint invoice_requires_customer_id
        check (kind <> 'invoice' or data ? 'customer_id'),
    -- Typed view columns must always cast, so a bad value is refused on write, not on read.
    constraint property_fields_typed check (kind <> 'property' or (
        (not data ? 'units' or jsonb_typeof(data -> 'units') = 'number')
        and (not data ? 'name' or jsonb_typeof(data -> 'name') = 'string'))),
    constraint customer_fields_typed check (kind <> 'customer' or (
        (not data ? 'email' or jsonb_typeof(data -> 'email') = 'string')
        and (not data ? 'name' or jsonb_typeof(data -> 'name') = 'string'))),
    constraint invoice_fields_typed check (kind <> 'invoice' or (
        (not data ? 'amount' or jsonb_typeof(data -> 'amount') = 'number')
        and (not data ? 'issued_on' or (data ->> 'issued_on') ~ '^\d{4}-\d{2}-\d{2}$')
        and (not data ? 'due_on' or (data ->> 'due_on') ~ '^\d{4}-\d{2}-\d{2}$')))
);

-- Rule: a customer's email is unique within its tenant, case-insensitively. The index leads
-- with tenant_id, so the same email in another tenant never collides.
create unique index customer_email_unique_per_tenant
    on public.records (tenant_id, lower(data ->> 'email'))
    where kind = 'customer' and data ? 'email';

-- Upserts by external id (imports) and incremental reads by kind and time; every index is led
-- by tenant_id so RLS-filtered plans stay index scans.
create unique index records_external_id_per_tenant
    on public.records (tenant_id, kind, external_id) where external_id is not null;
create index records_tenant_kind_updated on public.records (tenant_id, kind, updated_at);

create function public.touch_updated_at() returns trigger
    language plpgsql
    as $$ begin new.updated_at := now(); return new; end $$;

create trigger records_touch_updated_at before update on public.records
    for each row execute function public.touch_updated_at();

alter table public.records enable row level security;
-- FORCE: the views below are owned by the owner role, and owners bypass RLS unless forced.
alter table public.records force row level security;
-- Restrictive: AND-ed with every other policy, so a permissive policy added later can never
-- widen access beyond the current tenant.
create policy tenant_isolation on public.records as restrictive for all to public
    using (tenant_id = public.current_tenant_id())
    with check (tenant_id = public.current_tenant_id());
-- Restrictive policies alone grant nothing; this is the permissive grant they narrow.
create policy tenant_access on public.records as permissive for all to public
    using (tenant_id = public.current_tenant_id())
    with check (tenant_id = public.current_tenant_id());

-- Per-kind views with typed columns. Owned by the owner role: they read `records` with the
-- owner's rights, which FORCE keeps under the tenant policy.
create view public.v_property as
    select id, tenant_id, external_id,
           data ->> 'name' as name,
           data ->> 'address' as address,
           data ->> 'city' as city,
           (data ->> 'units')::integer as units,
           created_at, updated_at
    from public.records
    where kind = 'property';

create view public.v_customer as
    select id, tenant_id, external_id,
           data ->> 'name' as name,
           data ->> 'email' as email,
           created_at, updated_at
    from public.records
    where kind = 'customer';

create view public.v_invoice as
    select id, tenant_id, external_id,
           customer_ref as customer_id,
           data ->> 'number' as number,
           (data ->> 'amount')::numeric as amount,
           data ->> 'currency' as currency,
           data ->> 'status' as status,
           (data ->> 'issued_on')::date as issued_on,
           (data ->> 'due_on')::date as due_on,
           created_at, updated_at
    from public.records
    where kind = 'invoice';
