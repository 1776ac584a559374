"""Results: the record family (:mod:`.base`: common models, validation, reading and writing,
the kind -> model registry) and the metric registry (:mod:`.metrics`). Each record kind and
each metric registers itself from its own package; tables read every kind through here."""
