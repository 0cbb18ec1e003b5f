# The web UI (server/src/ui/): its browser tests (server/tests/ui_browser.rs)
# drive Debian's headless Chromium through chromedriver (WebDriver on
# 127.0.0.1). They fail, not skip, when either is missing.
need_apt chromium chromium
need_apt chromedriver chromium-driver
