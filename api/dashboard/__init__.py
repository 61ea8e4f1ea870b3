"""The dashboard: HTML pages and static files (``routes_pages``) and the analytics API they read
(``routes_analytics``, over the ``analytics`` package). Imports only tenancy among the api domains."""
