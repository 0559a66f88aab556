"""keytrace's Streamlit dashboard: key search, lifecycles, producer and consumer health, anomalies, export."""

from streamlit.runtime.pages_manager import PagesManager

# dashboard/pages/ holds st.navigation() pages, not Streamlit's legacy pages-folder layout, which
# Streamlit assumes until a process's first st.navigation() call: a deep link that is a fresh
# server's first request would show "Page not found". keytrace's commands import this package
# before they start the server.
PagesManager.uses_pages_directory = False
