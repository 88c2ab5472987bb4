-- Completes the run records of the jobs of one scoped transaction: several jobs of one tenant
-- in a round (src/rounds.rs), or a job that ran alone. Like complete_job_run before it, it is
-- also the check that no job changed the tenant context, and it is sent together with COMMIT,
-- so when it raises nothing commits. Compared as text, so a garbage value in app.tenant_id is
-- reported as a changed context rather than as a cast error.
--
-- p_done: [{"job_id": <uuid>, "result": <jsonb>}, ...] for the jobs that succeeded; p_failed:
-- the jobs that failed, whose work was rolled back to their savepoints and whose claimed run
-- records are dropped here so that their retries can claim them again.
--
-- SECURITY INVOKER, as the app role, under the same RLS as the jobs: it can only ever see and
-- change the current tenant's run records.
create function public.complete_job_runs(p_tenant uuid, p_done jsonb, p_failed uuid[])
    returns void
    language plpgsql
    as $$
declare
    completed integer;
begin
    if current_setting('app.tenant_id', true) is distinct from p_tenant::text then
        raise exception 'a job changed the tenant context (app.tenant_id)'
            using errcode = 'TW001';
    end if;
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

-- A job that runs alone completes through the same function (a round of one), so the
-- one-job version has no caller left.
drop function public.complete_job_run(uuid, uuid, jsonb);
