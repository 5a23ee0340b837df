"""Browser test UI: one page and its static assets, served by the service itself (no CDN)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["web"], include_in_schema=False)
