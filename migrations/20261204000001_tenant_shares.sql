-- Per-tenant scheduling settings (`tenant set`, `tenant pause`): the tenant's weight in the
-- fair fetch, a cap on its jobs running at once across all workers (null: none), and whether
-- its jobs wait (paused: kept queued, unlike a suspended tenant's, which are refused).
alter table public.tenants
    add column weight integer not null default 1 check (weight between 1 and 1000),
    add column max_running integer check (max_running between 1 and 100000),
    add column paused boolean not null default false;
