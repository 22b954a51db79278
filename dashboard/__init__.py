"""The Streamlit dashboard: a thin layer over ``core``.

``app.py`` is the entry point (``streamlit run dashboard/app.py``); pages live in ``app_pages/``;
``queries.py`` is the only module that opens the catalog; ``charts.py`` turns DataFrames into Plotly
figures without importing Streamlit; ``widgets.py`` holds reusable pieces (the thumbnail grid).
Nothing here imports torch, faiss, open_clip or umap (``tests/test_layering.py``).
"""
