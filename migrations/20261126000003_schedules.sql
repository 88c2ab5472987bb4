-- Per-tenant cron schedules. Tenant data like any other: RLS enabled, forced, restrictive.
-- The scheduler role reads every tenant's schedules through a narrow policy on this table only
-- (added by setup, because role names are configurable); it never bypasses RLS.
create table public.schedules (
    tenant_id uuid not null references public.tenants (id),
    id uuid not null default gen_random_uuid(),
    cron text not null check (length(cron) between 1 and 200),
    timezone text not null default 'UTC' check (length(timezone) between 1 and 64),
    kind text not null check (kind ~ '^[a-z][a-z0-9_]{0,39}$'),
    args jsonb not null default '{}' check (jsonb_typeof(args) = 'object'),
    enabled boolean not null default true,
    created_at timestamptz not null default now(),
    primary key (tenant_id, id),
    constraint schedules_id_key unique (id)
);

alter table public.schedules enable row level security;
alter table public.schedules force row level security;
create policy tenant_isolation on public.schedules as restrictive for all to public
    using (tenant_id = public.current_tenant_id())
    with check (tenant_id = public.current_tenant_id());
create policy tenant_access on public.schedules as permissive for all to public
    using (tenant_id = public.current_tenant_id())
    with check (tenant_id = public.current_tenant_id());

-- The scheduler's own bookkeeping: the last fire time it turned into a job, per schedule.
-- Ids and times only, no tenant data; readable by the scheduler role alone.
create table public.schedule_fires (
    schedule_id uuid primary key references public.schedules (id) on delete cascade,
    last_fire timestamptz not null
);
