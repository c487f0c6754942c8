// Starts Swagger UI on /docs over the service's own /openapi.json (a file, not an inline script:
// the page's Content-Security-Policy allows only the service's own scripts).
"use strict";
window.addEventListener("DOMContentLoaded", () => {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    // No calls to swagger.io's validator: nothing leaves the service.
    validatorUrl: null,
  });
});
