"""Selling credits: the offer catalog (packs, plans), Stripe Checkout, provider webhooks (Stripe, RevenueCat,
Lemon Squeezy) mapped to ledger postings, payments and entitlements. See api/README.md "Payments"."""
