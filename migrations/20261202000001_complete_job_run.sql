-- Completes a job's run record at the end of the job's own scoped transaction, and is at the
-- same time the check that the job left the tenant context alone. The worker sends it together
-- with COMMIT in one message: when it raises, PostgreSQL skips the rest of the message, so the
-- COMMIT never runs and the worker rolls the job's work back.
--
-- SECURITY INVOKER (the default): it runs as the app role, under the same RLS as the job, so it
-- can only ever see and complete the current tenant's run record. Compared as text, so a garbage
-- value in app.tenant_id is reported as a changed context rather than as a cast error.
create function public.complete_job_run(p_tenant uuid, p_job uuid, p_result jsonb)
    returns void
    language plpgsql
    as $$
begin
    if current_setting('app.tenant_id', true) is distinct from p_tenant::text then
        raise exception 'the job changed the tenant context (app.tenant_id)'
            using errcode = 'TW001';
    end if;
    update public.job_runs
       set result = p_result, finished_at = clock_timestamp()
     where tenant_id = p_tenant and job_id = p_job;
    if not found then
        raise exception 'the run record of job % is not visible in its tenant context', p_job
            using errcode = 'TW001';
    end if;
end $$;
