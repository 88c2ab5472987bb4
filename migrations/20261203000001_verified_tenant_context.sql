-- A tenant context the job's own SQL cannot forge.
--
-- Until now the policies trusted `app.tenant_id`, a setting any SQL can change: a job that ran
-- `set_config('app.tenant_id', <another tenant>, true)` saw that tenant's rows until the
-- commit-time check refused its transaction, which is too late for rows it had already read
-- (into an export file, say). Now the worker also sets `app.tenant_ctx`, a *sealed* context:
--
--     v1.<key id>.<tenant id>.<expires, unix seconds>.<binding>.<hmac hex>
--
-- the HMAC-SHA256 under a key only the owner role can read (`tenant_context_keys`) of the text
-- before its last dot. The binding names this very transaction: the server process and the
-- transaction's start time in microseconds (`tenant_context_binding()`), which no other
-- transaction has, and which costs no transaction id (a read-only transaction stays one).
-- `tenant_context_valid()` checks it all: the key exists and is in force, the seal matches, it
-- has not expired, it was made for this transaction (so a context copied from an earlier one,
-- on a pooled connection or elsewhere, is worth nothing) and it names the tenant
-- `app.tenant_id` names. Every tenant policy requires it, so setting `app.tenant_id` alone
-- grants nothing.
--
-- The policies keep `tenant_id = current_tenant_id()` for the planner (it estimates with the
-- setting's value, so a small tenant's queries keep their index scans) and add
-- `(select tenant_context_valid())`: an uncorrelated sub-select, computed once per statement,
-- which PostgreSQL evaluates as a one-time filter, not per row.

create table public.tenant_context_keys (
    id integer generated always as identity primary key,
    key bytea not null check (length(key) = 32),
    created_at timestamptz not null default now(),
    -- NULL: the key in force; set when a newer key replaces it (old contexts stay valid until
    -- then, so workers that have not picked up the new key yet keep working).
    valid_until timestamptz
);
revoke all on public.tenant_context_keys from public;

insert into public.tenant_context_keys (key) select public.gen_random_bytes(32);

-- What a context is bound to: this server process and this transaction's start, in
-- microseconds. The worker reads it right after BEGIN and seals it.
create function public.tenant_context_binding() returns text
    language sql stable
    as $$ select pg_catalog.pg_backend_pid()::text operator(pg_catalog.||) '-'
                 operator(pg_catalog.||) ((extract(epoch from pg_catalog.transaction_timestamp())
                                           operator(pg_catalog.*) 1000000)::bigint)::text $$;

-- True when `app.tenant_ctx` is a context sealed for this transaction, in force, naming the
-- tenant of `app.tenant_id`. plpgsql so its statements are planned once per session; SECURITY
-- DEFINER (owned by the owner) so it can read the keys the caller cannot; a fixed search_path
-- and qualified names, so nothing the caller creates can stand in for what it uses. The shape
-- is checked with `translate` and lengths, not a regular expression: one with counted
-- repetitions cost about 35 µs a call, most of the verifier's time.
create function public.tenant_context_valid() returns boolean
    language plpgsql stable security definer
    set search_path = pg_catalog, pg_temp
    as $$
declare
    ctx text := current_setting('app.tenant_ctx', true);
    part text[];
    k bytea;
begin
    if ctx is null or length(ctx) > 200 then
        return false;
    end if;
    part := string_to_array(ctx, '.');
    if cardinality(part) <> 6 or part[1] <> 'v1'
       or part[3] is distinct from current_setting('app.tenant_id', true)
       or part[5] is distinct from public.tenant_context_binding()
       or length(part[2]) not between 1 and 9 or translate(part[2], '0123456789', '') <> ''
       or length(part[4]) not between 1 and 18 or translate(part[4], '0123456789', '') <> ''
       or length(part[6]) <> 64 or translate(part[6], '0123456789abcdef', '') <> '' then
        return false;
    end if;
    if part[4]::bigint <= extract(epoch from statement_timestamp())::bigint then
        return false;
    end if;
    select c.key into k from public.tenant_context_keys c
     where c.id = part[2]::integer
       and (c.valid_until is null or c.valid_until > statement_timestamp());
    if k is null then
        return false;
    end if;
    return public.hmac(convert_to(array_to_string(part[1:5], '.'), 'UTF8'), k, 'sha256')
           = decode(part[6], 'hex');
end $$;

-- Every tenant policy requires the sealed context.
do $$
declare t text;
begin
    foreach t in array array['records', 'job_runs', 'schedules', 'rollups', 'rollup_changes',
                             'rollup_runs'] loop
        execute format($p$alter policy tenant_isolation on public.%I
            using (tenant_id = public.current_tenant_id() and (select public.tenant_context_valid()))
            with check (tenant_id = public.current_tenant_id() and (select public.tenant_context_valid()))$p$, t);
        execute format($p$alter policy tenant_access on public.%I
            using (tenant_id = public.current_tenant_id() and (select public.tenant_context_valid()))
            with check (tenant_id = public.current_tenant_id() and (select public.tenant_context_valid()))$p$, t);
    end loop;
end $$;

alter policy tenant_self on public.tenants
    using (id = public.current_tenant_id() and (select public.tenant_context_valid()));

-- One guard row per job transaction, inserted by the worker before the job runs and deleted
-- only by `complete_job_runs` with the worker's completion seal. Its deferred check runs at
-- COMMIT: a transaction that still holds its guard (the job's own SQL sent COMMIT, or committed
-- through sqlx) fails to commit, so nothing the job did is published.
create table public.scope_guards (
    xid xid8 primary key default pg_current_xact_id()
);
revoke all on public.scope_guards from public;

create function public.scope_guard_check() returns trigger
    language plpgsql security definer
    set search_path = pg_catalog, pg_temp
    as $$
begin
    if exists (select 1 from public.scope_guards g where g.xid = new.xid) then
        raise exception 'a job transaction can only be committed by the worker'
            using errcode = 'TW002';
    end if;
    return null;
end $$;

create constraint trigger scope_guard_completed after insert on public.scope_guards
    deferrable initially deferred
    for each row execute function public.scope_guard_check();

-- Completes the run records of one job transaction (see 20261202000003), now also checking
-- the sealed context and, with the worker's completion seal (the HMAC of `v1.done.<binding>`
-- under the context key), releasing the transaction's guard. SECURITY DEFINER for the guard and the
-- keys; the run records themselves are still read and written under the same RLS as the jobs
-- (the owner is subject to the forced policies), so it can only ever touch the current
-- tenant's records.
drop function public.complete_job_runs(uuid, jsonb, uuid[]);

create function public.complete_job_runs(p_tenant uuid, p_done jsonb, p_failed uuid[],
                                         p_seal text)
    returns void
    language plpgsql security definer
    set search_path = pg_catalog, pg_temp
    as $$
declare
    completed integer;
    part text[] := string_to_array(current_setting('app.tenant_ctx', true), '.');
    k bytea;
begin
    if current_setting('app.tenant_id', true) is distinct from p_tenant::text
       or not public.tenant_context_valid() then
        raise exception 'a job changed the tenant context (app.tenant_id)'
            using errcode = 'TW001';
    end if;
    select c.key into k from public.tenant_context_keys c where c.id = part[2]::integer;
    if p_seal is distinct from encode(public.hmac(convert_to('v1.done.' || part[5], 'UTF8'), k,
                                                  'sha256'), 'hex') then
        raise exception 'the completion seal does not match this transaction'
            using errcode = 'TW001';
    end if;
    delete from public.scope_guards where xid = pg_current_xact_id();
    update public.job_runs r
       set result = d.result, finished_at = clock_timestamp()
      from jsonb_to_recordset(p_done) as d(job_id uuid, result jsonb)
     where r.tenant_id = p_tenant and r.job_id = d.job_id;
    get diagnostics completed = row_count;
    if completed <> jsonb_array_length(p_done) then
        raise exception 'a run record of the round is not visible in its tenant context'
            using errcode = 'TW001';
    end if;
    delete from public.job_runs where tenant_id = p_tenant and job_id = any(p_failed);
end $$;

-- Every unique and foreign key on a tenant table leads with tenant_id: a duplicate-key error
-- on `schedules.id` alone told a tenant that another tenant's schedule with that id existed.
-- The scheduler's bookkeeping no longer references it (`schedule remove` deletes its row).
alter table public.schedule_fires drop constraint schedule_fires_schedule_id_fkey;
alter table public.schedules drop constraint schedules_id_key;

