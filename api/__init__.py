"""The FastAPI service: ingestion, projects and people, wallets and money operations, analytics, dashboard."""
