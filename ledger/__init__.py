"""The money core: wallets, credit buckets, the append-only transaction log, usage counters and the
checkpoint protocol that applies metered usage exactly once. Imports none of the other components."""
