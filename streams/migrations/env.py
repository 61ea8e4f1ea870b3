from ledger.schema_migrations import run_env

run_env()
