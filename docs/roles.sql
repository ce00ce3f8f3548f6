-- Least-privilege roles for pg-kafka-cdc: a source role that cdc-source (and cdc-sink's bulk copy,
-- cdc-verify and cdc-status) log in with, and a target role for cdc-sink (and cdc-verify, cdc-status).
-- Neither is a superuser; each gets only what the programs use. Run this script with psql as an
-- administrator, connected to the database concerned, once on each server:
--
--   psql -X -d "host=SOURCE dbname=DB user=postgres" -v part=source \
--        -v source_role=cdc_source -v source_password='...' \
--        -v tables=public.person,public.orders -f docs/roles.sql
--
--   psql -X -d "host=TARGET dbname=DB user=postgres" -v part=target \
--        -v target_role=cdc_sink -v target_password='...' \
--        -v schemas=public [-v state_schema=cdc_sink] -f docs/roles.sql
--
-- `tables` is the comma-separated list given to --tables (schema.table; a name holding a comma or a
-- dot needs its double quotes). Run the source part again with the new list when tables are added.
-- pg_hba.conf must let the source role connect to the database AND to `replication` (the stack's
-- `host replication all 127.0.0.1/32 scram-sha-256` line does).

\set ON_ERROR_STOP on
SELECT :'part' = 'source' AS cdc_on_source, :'part' = 'target' AS cdc_on_target \gset
\if :cdc_on_source
\elif :cdc_on_target
\else
\echo 'roles.sql: set -v part=source or -v part=target'
SELECT 1/0 AS "roles.sql needs -v part=source or -v part=target";
\endif

\if :cdc_on_source
-- LOGIN and REPLICATION: create the logical slot and stream from it. Nothing else is needed for
-- the rest of what the connector does: the catalog, pg_replication_slots, pg_current_wal_lsn(),
-- pg_control_system() and pg_logical_emit_message() (--heartbeat-interval) are open to every role.
CREATE ROLE :"source_role" LOGIN REPLICATION PASSWORD :'source_password';
GRANT CONNECT ON DATABASE :"DBNAME" TO :"source_role";

-- SELECT on the replicated tables only (initial snapshot, bulk copy, cdc-verify, and reading back
-- unchanged TOASTed values after a key change), and USAGE on their schemas.
SELECT DISTINCT format('GRANT USAGE ON SCHEMA %I TO %I', n.nspname, :'source_role')
FROM unnest(string_to_array(:'tables', ',')) AS t(name)
JOIN pg_class c ON c.oid = trim(t.name)::regclass
JOIN pg_namespace n ON n.oid = c.relnamespace
\gexec
SELECT format('GRANT SELECT ON TABLE %s TO %I', trim(t.name)::regclass, :'source_role')
FROM unnest(string_to_array(:'tables', ',')) AS t(name)
\gexec
\endif

\if :cdc_on_target
\if :{?state_schema}
\else
\set state_schema cdc_sink
\endif
-- LOGIN only: cdc-sink creates the replicated tables itself (so it owns them and can add columns)
-- and keeps its offsets and progress in its own schema.
CREATE ROLE :"target_role" LOGIN PASSWORD :'target_password';
GRANT CONNECT ON DATABASE :"DBNAME" TO :"target_role";

-- The sink's own schema (--state-schema), made here and owned by the role.
CREATE SCHEMA IF NOT EXISTS :"state_schema" AUTHORIZATION :"target_role";

-- Apply as a replica, as PostgreSQL's logical replication does (session_replication_role =
-- replica): the target tables' foreign keys and ordinary triggers do not fire for rows the source
-- already checked, and an order may be applied before its person (each table has its own topic).
-- Without it cdc-sink still runs, with a warning, as an ordinary session. PostgreSQL 15 or later.
GRANT SET ON PARAMETER session_replication_role TO :"target_role";

-- The schemas of the replicated tables: made here when missing; the role may create tables in them.
SELECT format('CREATE SCHEMA IF NOT EXISTS %I', trim(s.name))
FROM unnest(string_to_array(:'schemas', ',')) AS s(name)
\gexec
SELECT format('GRANT USAGE, CREATE ON SCHEMA %I TO %I', trim(s.name), :'target_role')
FROM unnest(string_to_array(:'schemas', ',')) AS s(name)
\gexec
\endif
