"""Serving: bundles, the predictor with value-model fusion, auto-batching, sessions
and the Open Inference Protocol server (`tidal export`, `tidal serve`)."""

from tidal.serving.batcher import Batcher, Overloaded, split_rows
from tidal.serving.bundle import Bundle, export, export_delta, load_bundle
from tidal.serving.predictor import Piece, Predictor, UserState, fuse
from tidal.serving.protocol import RequestError
from tidal.serving.server import LoadingAnswers, RunningServer, Service, create_app, listen, serve, start_server
from tidal.serving.sessions import SessionCache, SessionError

__all__ = ["Batcher", "Bundle", "LoadingAnswers", "Overloaded", "Piece", "Predictor", "RequestError", "RunningServer",
           "Service", "SessionCache", "SessionError", "UserState", "create_app", "export", "export_delta", "fuse", "listen",
           "load_bundle", "serve", "split_rows", "start_server"]
