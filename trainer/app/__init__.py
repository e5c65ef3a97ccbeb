"""The served product: the tab (ui, views, compat), the job queue, the HTTP API, the standalone server and
the host interface they run a job through. Nothing here imports the WebUI; ``webui/`` supplies its host."""
