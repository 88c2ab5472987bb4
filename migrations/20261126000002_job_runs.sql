-- One row per job that took effect, written in the job's own scoped transaction. The primary
-- key (tenant_id, job_id) makes a redelivered or replayed job a no-op: delivery is
-- at-least-once, effects happen once.
create table public.job_runs (
    tenant_id uuid not null references public.tenants (id),
    job_id uuid not null,
    kind text not null,
    attempt integer not null,
    result jsonb,
    started_at timestamptz not null default now(),
    finished_at timestamptz,
    primary key (tenant_id, job_id)
);

alter table public.job_runs enable row level security;
alter table public.job_runs force row level security;
create policy tenant_isolation on public.job_runs as restrictive for all to public
    using (tenant_id = public.current_tenant_id())
    with check (tenant_id = public.current_tenant_id());
create policy tenant_access on public.job_runs as permissive for all to public
    using (tenant_id = public.current_tenant_id())
    with check (tenant_id = public.current_tenant_id());
