# scripts/quickstart drives the control plane's API as an operator would:
# curl for HTTP, jq for the JSON (jq also comes with 10-bundle.sh).
need_apt curl curl
need_apt jq jq
