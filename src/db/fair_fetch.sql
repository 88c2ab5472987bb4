-- Tenant-fair fetch over apalis.jobs (see runtime::backend for the design). Applied by
-- `setup`/`migrate` after apalis-postgres's migrations, idempotently: every statement here can
-- run again on a database that already has it.
--
-- A lane is one tenant's work in one queue. Lanes are served in order of their virtual time
-- (`vtime`): a fetch takes the ready lane with the lowest one, claims up to about one quantum
-- of its jobs and charges it their estimated cost divided by the tenant's weight. A lane that
-- had nothing to run is lifted to the queue's virtual time when it has work again, so idle
-- time earns no credit.
--
-- Locking protocol (why no job is ever stranded in a lane marked empty):
-- * a fetch locks a lane FOR NO KEY UPDATE SKIP LOCKED, so all claims of one tenant are
--   serialised and a cap is checked against a count no concurrent claim can invalidate;
-- * whatever puts runnable work in the table (insert, retry, snooze, re-enqueue) goes through
--   `tenant_lanes_note_work`, which holds the lane FOR KEY SHARE (compatible with fetches) or
--   re-activates it;
-- * a lane is retired (`tenant_lanes_rest`) only under FOR UPDATE, which conflicts with that
--   KEY SHARE, and only after a fresh snapshot taken once the lock is held shows no work.

create table if not exists apalis.tenant_lanes (
    queue text not null,
    -- The routing copy of the tenant id (`metadata -> 'tenant_id'`), '' for rows without one.
    tenant text not null,
    -- The same as a uuid when it is one: joins the registry for weight, cap and pause.
    registry_id uuid,
    vtime double precision not null default 0,
    -- Estimated seconds of worker time per job, a moving average of what the workers report;
    -- null until the first report.
    cost double precision,
    -- Has (or may have) work; an inactive lane is out of every scan.
    active boolean not null default true,
    -- Active, but nothing to run before `ready_at` ('infinity': paused).
    waiting boolean not null default false,
    ready_at timestamptz not null default '-infinity',
    primary key (queue, tenant)
);

create index if not exists tenant_lanes_ready on apalis.tenant_lanes (queue, vtime, tenant)
    where active and not waiting;
create index if not exists tenant_lanes_waiting on apalis.tenant_lanes (queue, ready_at)
    where active and waiting;
create index if not exists tenant_lanes_tenant on apalis.tenant_lanes (registry_id);
-- A capped tenant's running jobs, counted before each of its claims.
create index if not exists apalis_jobs_tenant_running on apalis.jobs
    (job_type, (coalesce(metadata -> 'tenant_id', ''))) where status = 'Running';

create or replace function apalis.tenant_lanes_note_work() returns trigger
language plpgsql as $$
declare
    r record;
    floor_v double precision;
begin
    for r in
        select n.job_type as queue, coalesce(n.metadata -> 'tenant_id', '') as tenant,
               min(n.run_at) as run_at
        from new_rows n
        where n.status = 'Pending' or (n.status = 'Failed' and n.attempts < n.max_attempts)
        group by 1, 2
        order by 1, 2
    loop
        -- The common case, one index probe: the lane is ready, or waits for a time no later
        -- than this work's. KEY SHARE keeps it from being retired until this transaction ends.
        perform 1 from apalis.tenant_lanes l
        where l.queue = r.queue and l.tenant = r.tenant and l.active
          and (not l.waiting or l.ready_at <= r.run_at)
        for key share;
        continue when found;
        select l.vtime into floor_v from apalis.tenant_lanes l
        where l.queue = r.queue and l.active and not l.waiting
        order by l.vtime limit 1;
        insert into apalis.tenant_lanes as l (queue, tenant, registry_id, vtime, active, waiting, ready_at)
        values (r.queue, r.tenant,
                case when r.tenant ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                     then r.tenant::uuid end,
                coalesce(floor_v, 0), true, r.run_at > now(), r.run_at)
        on conflict (queue, tenant) do update
        set vtime = greatest(l.vtime, excluded.vtime),
            ready_at = case when l.active then least(l.ready_at, excluded.ready_at)
                            else excluded.ready_at end,
            waiting = (case when l.active then least(l.ready_at, excluded.ready_at)
                            else excluded.ready_at end) > now(),
            active = true;
    end loop;
    return null;
end $$;

drop trigger if exists tenant_lanes_on_insert on apalis.jobs;
create trigger tenant_lanes_on_insert after insert on apalis.jobs
    referencing new table as new_rows
    for each statement execute function apalis.tenant_lanes_note_work();
drop trigger if exists tenant_lanes_on_update on apalis.jobs;
create trigger tenant_lanes_on_update after update on apalis.jobs
    referencing new table as new_rows
    for each statement execute function apalis.tenant_lanes_note_work();

-- Retires a lane the caller holds and found nothing to claim in: inactive when it has no
-- waiting work at all, waiting until its next job's time when that is in the future. Left as
-- it is when an enqueue in flight holds it (it is about to have work) or when work it could
-- not claim is runnable now (locked by someone else, or of kinds that worker does not run).
create or replace function apalis.tenant_lanes_rest(p_queue text, p_tenant text) returns void
language plpgsql as $$
declare
    nxt timestamptz;
begin
    perform 1 from apalis.tenant_lanes
    where queue = p_queue and tenant = p_tenant
    for update skip locked;
    if not found then
        return;
    end if;
    -- A statement of its own, so a snapshot taken after the lock: every enqueue that held the
    -- lane has committed (and is seen) or rolled back.
    select min(j.run_at) into nxt from apalis.jobs j
    where j.job_type = p_queue and coalesce(j.metadata -> 'tenant_id', '') = p_tenant
      and (j.status = 'Pending' or (j.status = 'Failed' and j.attempts < j.max_attempts));
    if nxt <= now() then
        return;
    end if;
    update apalis.tenant_lanes
    set active = nxt is not null, waiting = nxt is not null, ready_at = coalesce(nxt, '-infinity')
    where queue = p_queue and tenant = p_tenant;
end $$;

-- The fair fetch: up to `p_batch` runnable jobs of kinds `p_kinds`, all of one tenant, marked
-- `Running` for `p_worker`, each with its tenant and the cost per job it was charged. Marker
-- rows (id null) say more: `note` 'busy' when it found nothing but skipped lanes other
-- fetches held (try again at once), 'capped <tenant>' for each lane it passed over at its
-- cap, 'kept <tenant>' for a report it could not apply (the lane was held; send it again).
--
-- The report (`p_cost_*`, per tenant, since the caller's last fetch): jobs finished, the
-- worker time each took on average, what their claims were charged in all. The time folds into
-- the lane's estimate (a sample is bounded to ten times the estimate, so one stalled round
-- cannot throw a tenant's share off for long), and the difference between what the jobs cost
-- by the new estimate and what their claims were charged is added to the lane's virtual time
-- (divided by the weight), so a tenant pays for what it used even when its jobs were
-- underestimated (a new tenant's first claims, jobs that got slower).
create or replace function apalis.fair_fetch(
    p_worker text, p_queue text, p_batch integer, p_kinds text[], p_quantum double precision,
    p_cost_tenants text[], p_cost_jobs double precision[], p_cost_secs double precision[],
    p_cost_charged double precision[])
returns table (id text, job bytea, job_type text, attempts integer, max_attempts integer,
               tenant text, charged double precision, note text)
language plpgsql as $$
#variable_conflict use_column
declare
    cand record;
    lane record;
    k integer;
    n integer;
    running integer;
    floor_v double precision;
    est double precision;
    busy boolean := false;
begin
    if cardinality(p_cost_tenants) > 0 then
        return query
        with held as (
            select x.tenant from apalis.tenant_lanes x
            where x.queue = p_queue and x.tenant = any(p_cost_tenants)
            order by x.tenant
            for no key update skip locked
        ), applied as (
            -- By primary key, one lane at a time (a join through `measured` lanes read the
            -- whole table); the new estimate is written out twice as SET sees the old row.
            update apalis.tenant_lanes l
            set cost = case when l.cost is null then greatest(m.secs, 1e-6)
                            else l.cost * 0.75 + least(greatest(m.secs, 1e-6), l.cost * 10) * 0.25
                       end,
                vtime = l.vtime
                        + (m.jobs * case when l.cost is null then greatest(m.secs, 1e-6)
                                         else l.cost * 0.75
                                              + least(greatest(m.secs, 1e-6), l.cost * 10) * 0.25
                                    end
                           - m.charged)
                        / coalesce((select t.weight from public.tenants t
                                    where t.id = l.registry_id), 1)
            from held
            join unnest(p_cost_tenants, p_cost_jobs, p_cost_secs, p_cost_charged)
                     as m(tenant, jobs, secs, charged) on m.tenant = held.tenant
            where l.queue = p_queue and l.tenant = held.tenant
            returning l.tenant
        )
        select null::text, null::bytea, null::text, null::integer, null::integer, null::text,
               null::double precision, 'kept ' || x.tenant
        from apalis.tenant_lanes x
        where x.queue = p_queue and x.tenant = any(p_cost_tenants)
          and x.tenant not in (select a.tenant from applied a);
    end if;
    -- Lanes whose next job's time has come are ready again, lifted to the lowest virtual time
    -- of the ready lanes.
    select l.vtime into floor_v from apalis.tenant_lanes l
    where l.queue = p_queue and l.active and not l.waiting
    order by l.vtime limit 1;
    update apalis.tenant_lanes l
    set waiting = false, vtime = greatest(l.vtime, coalesce(floor_v, l.vtime))
    from (select w.tenant from apalis.tenant_lanes w
          where w.queue = p_queue and w.active and w.waiting and w.ready_at <= now()
          order by w.ready_at limit 64
          for no key update skip locked) due
    where l.queue = p_queue and l.tenant = due.tenant;

    for cand in
        select c.tenant from apalis.tenant_lanes c
        where c.queue = p_queue and c.active and not c.waiting
        order by c.vtime, c.tenant
        limit 256
    loop
        select l.tenant, l.cost, coalesce(t.weight, 1) as weight, t.max_running,
               coalesce(t.paused, false) as paused
        into lane
        from apalis.tenant_lanes l left join public.tenants t on t.id = l.registry_id
        where l.queue = p_queue and l.tenant = cand.tenant and l.active and not l.waiting
        for no key update of l skip locked;
        if not found then
            busy := true;
            continue;
        end if;
        if lane.paused then
            -- Out of the scans until `tenant resume` (or new work) makes it ready again.
            update apalis.tenant_lanes set waiting = true, ready_at = 'infinity'
            where queue = p_queue and tenant = lane.tenant;
            continue;
        end if;
        -- About one quantum of the tenant's work, so a slot is never held long while others
        -- wait. A tenant whose jobs have not been measured yet is taken to cost what other
        -- tenants' jobs in this queue do (what it really used is charged once it reports);
        -- with nothing measured at all, a full batch is taken to fill the quantum.
        est := lane.cost;
        if est is null then
            select avg(m.cost) into est from (
                select x.cost from apalis.tenant_lanes x
                where x.queue = p_queue and x.active and x.cost is not null
                limit 16) m;
        end if;
        est := greatest(coalesce(est, p_quantum / p_batch), 1e-6);
        k := least(p_batch, greatest(1, floor(p_quantum / est))::integer);
        if lane.cost is null and k > 4 and exists (
            select 1 from apalis.tenant_lanes x
            where x.queue = p_queue and x.active and x.cost is not null and x.tenant <> lane.tenant)
        then
            -- Others are measured and this one is not: its jobs may be far longer than theirs,
            -- so a few until it reports, rather than a batch that could fill every slot.
            k := 4;
        end if;
        if lane.max_running is not null then
            select count(*) into running from (
                select 1 from apalis.jobs r
                where r.job_type = p_queue and r.status = 'Running'
                  and coalesce(r.metadata -> 'tenant_id', '') = lane.tenant
                limit lane.max_running) s;
            if running >= lane.max_running then
                return query select null::text, null::bytea, null::text, null::integer,
                                    null::integer, null::text, null::double precision,
                                    'capped ' || lane.tenant;
                continue;
            end if;
            k := least(k, lane.max_running - running);
        end if;
        return query
        with picked as (
            select j.id from apalis.jobs j
            where j.job_type = p_queue
              and (j.status = 'Pending' or (j.status = 'Failed' and j.attempts < j.max_attempts))
              and j.run_at < now()
              and coalesce(j.metadata -> 'tenant_id', '') = lane.tenant
              and coalesce(j.metadata -> 'kind', '') = any(p_kinds)
            order by j.priority desc, j.run_at asc
            limit k
            for update skip locked
        ), claimed as (
            update apalis.jobs j
            set status = 'Running', lock_by = p_worker, lock_at = now()
            from picked
            where j.id = picked.id
            returning j.id, j.job, j.job_type, j.attempts, j.max_attempts
        )
        select c.id, c.job, c.job_type, c.attempts, c.max_attempts, lane.tenant, est,
               null::text
        from claimed c;
        get diagnostics n = row_count;
        if n > 0 then
            update apalis.tenant_lanes set vtime = vtime + n * est / lane.weight
            where queue = p_queue and tenant = lane.tenant;
            if n < k then
                -- Fewer than asked for: most likely the last of its work, so retire it now
                -- rather than have the next fetch find it empty.
                perform apalis.tenant_lanes_rest(p_queue, lane.tenant);
            end if;
            return;
        end if;
        perform apalis.tenant_lanes_rest(p_queue, lane.tenant);
    end loop;
    if busy then
        return query select null::text, null::bytea, null::text, null::integer, null::integer,
                            null::text, null::double precision, 'busy'::text;
    end if;
end $$;

-- Lanes for work queued before this file was first applied.
insert into apalis.tenant_lanes (queue, tenant, registry_id, ready_at, waiting)
select j.job_type, coalesce(j.metadata -> 'tenant_id', ''),
       case when coalesce(j.metadata -> 'tenant_id', '')
                 ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
            then (j.metadata -> 'tenant_id')::uuid end,
       min(j.run_at), min(j.run_at) > now()
from apalis.jobs j
where j.status = 'Pending' or (j.status = 'Failed' and j.attempts < j.max_attempts)
group by 1, 2, 3
on conflict (queue, tenant) do nothing;
