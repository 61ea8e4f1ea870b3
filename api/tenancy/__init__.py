"""Tenancy: users, sign-in (auth), projects and members, invitations, API keys, the audit log and invitation
email (outbox, policy, SMTP relay), with their routers (``routes_*``). Imports no other api domain.
See api/README.md."""
