"""Serving and explaining: the web app (server, backend, page) and Grad-CAM."""
