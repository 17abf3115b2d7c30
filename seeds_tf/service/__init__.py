"""The DEEPaaS face's pieces: argument and response schemas, request parsing. `seeds_tf.api` uses them."""
