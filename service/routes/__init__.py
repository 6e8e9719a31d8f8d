"""The service's HTTP routes, one module per resource, each an ``APIRouter`` that
:func:`tether.service.app.create_app` includes; what they share (the store, the relay, the
authenticated user) comes through FastAPI dependencies (``auth.current_user``,
:func:`tether.service.context.services`)."""
