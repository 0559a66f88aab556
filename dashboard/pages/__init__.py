"""The dashboard's pages, each run by st.navigation from dashboard/app.py; `common` holds what they share."""
