"""Analysis API for the gateway's provider plugin (X-API-Key, analysis keys)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/api", tags=["analysis"])
