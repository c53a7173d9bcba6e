"""The operator's seat: REST API, dashboard, Prometheus metrics, health and webhooks, served by
a thread of the main process (`server`), never by a receiver: a page or a scrape cannot delay a
C-STORE."""
