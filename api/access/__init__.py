"""Access checks: the pure policy and the recorded (optionally charged) decisions, with their router.
Imports tenancy, wallets and payments (entitlement statuses). See api/README.md."""
