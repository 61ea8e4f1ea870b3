"""Wallets and money operations: wallet models and routes, debits (group commit, the fast lane),
Idempotency-Key records, feature prices, billing-rule routes, the sign-up bonus (with GeoIP) and account
erasure, with their routers (``routes_*``). Imports only tenancy among the api domains. See api/README.md."""
